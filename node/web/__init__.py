"""The admin web page, its JSON API and the Prometheus metrics."""
