"""The ``idaics`` command."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from node.outputs.settings import DEFAULT_OBJECTS, OBJECTS

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "models" / "idaics-v2"

if TYPE_CHECKING:
    from node.config import Settings
    from node.db import Job
    from node.training.metrics import Metrics


def _studies_in(paths: list[Path]) -> list[Path]:
    from node.phantom.generate import TRUTH_FILE

    found: list[Path] = []
    for p in paths:
        if (p / TRUTH_FILE).is_file():
            found.append(p)
        else:
            found.extend(sorted(q.parent for q in p.glob(f"*/{TRUTH_FILE}")))
    return found


def cmd_synth(args: argparse.Namespace) -> int:
    from node.phantom.generate import generate_studies

    if args.base is not None:
        return _synth_from_base(args)
    if args.studies < 1:
        raise ValueError(f"--studies must be at least 1, got {args.studies}")
    if args.slices is not None and not 150 <= args.slices <= 500:
        raise ValueError(f"--slices must be within 150-500, got {args.slices}")
    folders = generate_studies(
        args.out,
        args.studies,
        args.seed,
        workers=args.workers,
        slices=args.slices,
        co_occurrence=args.co_occurrence,
    )
    print(f"{len(folders)} studies written under {args.out}")
    return 0


def _synth_from_base(args: argparse.Namespace) -> int:
    from node.phantom.insert import base_levels, load_base, synth_from_base

    if args.base_labels is None:
        raise ValueError("--base needs --base-labels (a vertebra label map on the same grid)")
    if args.studies < 1:
        raise ValueError(f"--studies must be at least 1, got {args.studies}")
    base = load_base(args.base, args.base_labels, args.label_scheme, name=args.base_name)
    levels = base_levels(base)
    if args.levels:
        wanted = [x.strip() for x in args.levels.split(",") if x.strip()]
        missing = sorted(set(wanted) - {lv.level for lv in levels})
        if missing:
            raise ValueError(
                f"--levels {', '.join(missing)}: not a level of {base.name} "
                f"({', '.join(lv.level for lv in levels) or 'none'})"
            )
        levels = [lv for lv in levels if lv.level in wanted]
    print(f"{base.name}: lesions go into {', '.join(lv.level for lv in levels) or 'no level'}")
    folders = synth_from_base(base, args.out, args.studies, args.seed, levels=levels)
    if args.pictures:
        from node.phantom.preview import render_inserted

        for f in folders:
            render_inserted(f, base.volume(), args.pictures)
    print(f"{len(folders)} studies of {base.name} with inserted lesions written under {args.out}")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Fit the card's confidence calibration on held-out studies (see node.training.calibrate)."""
    from node.training.calibrate import calibrate_from_rows
    from node.training.evaluate import evaluate_studies
    from node.training.train import update_card

    studies = _studies_in(args.studies)
    if not studies:
        print("no studies with truth.json found", file=sys.stderr)
        return 2
    update_card(args.model, calibration=None)  # fit on the model's own fused confidence
    _, extra = evaluate_studies(args.model, studies, device=args.device, keep_rows=True)
    entry = calibrate_from_rows(
        extra["discs"],
        args.model / "reliability.png",
        f"{args.model.name}: {len(studies)} held-out studies",
    )
    entry["data"] = args.description or f"{len(studies)} studies: " + ", ".join(
        sorted({s.parent.name for s in studies})
    )
    update_card(args.model, calibration=entry)
    print(
        f"Platt a={entry['a']} b={entry['b']}: ECE {entry['ece_before']} -> {entry['ece_after']} "
        f"on {entry['measured_on_discs']} discs not used for the fit"
    )
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    from node.phantom.preview import render_study

    studies = _studies_in(args.studies)
    if not studies:
        print("no phantom studies found", file=sys.stderr)
        return 2
    for s in studies:
        print(render_study(s, args.out))
    return 0


def cmd_dataset_build(args: argparse.Namespace) -> int:
    from node.training import importers
    from node.training.from_phantoms import build_from_phantoms

    if args.source == "phantoms":
        studies = _studies_in(args.input)
        from node.training.from_phantoms import Randomise

        writer = build_from_phantoms(
            studies,
            args.out,
            val_fraction=args.val_fraction,
            seed=args.seed,
            randomise=Randomise() if args.randomise else None,
        )
    elif args.source == "cases":
        from node.training.from_cases import TEST_STUDIES, build_from_cases

        if len(args.input) != 1:
            raise ValueError("--source cases takes one folder: the node's cases folder")
        writer = build_from_cases(
            args.input[0],
            args.out,
            views=args.views,
            test_fraction=args.test_fraction,
            val_fraction=args.val_fraction,
        )
        tests = writer.extra["studies"]["test"]
        print(
            f"test split (frozen, not in the dataset): {len(tests)} case(s) in {args.out / TEST_STUDIES}"
        )
    elif args.source == "labelme":
        writer = importers.build_from_labelme(
            args.input,
            args.out,
            mapping=args.mapping,
            val_fraction=args.val_fraction,
            seed=args.seed,
        )
    else:
        writer = importers.build_from_seg(
            args.input,
            args.out,
            mapping=args.mapping,
            ct=args.ct,
            val_fraction=args.val_fraction,
            seed=args.seed,
        )
    print(writer.summary())
    print(f"data.yaml: {args.out / 'data.yaml'}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from node.training.evaluate import evaluate_dataset
    from node.training.train import TrainOptions, train, update_card

    opts = TrainOptions(
        epochs=args.epochs,
        imgsz=args.imgsz,
        batch=args.batch,
        lr0=args.lr0,
        seed=args.seed,
        device=args.device,
        workers=args.workers,
        fraction=args.fraction,
        degrees=args.degrees,
    )
    card = train(
        args.data,
        args.out,
        from_weights=args.from_weights,
        options=opts,
        description=args.description or "",
        command="idaics " + " ".join(sys.argv[1:]),
    )
    from node.training.data import read_data_yaml

    if not read_data_yaml(args.data).images("val"):
        update_card(args.out, metrics={"per_image_val": "not measured: no validation split"})
        print("no validation split: nothing measured (score the model: idaics models evaluate)")
    else:
        metrics, _ = evaluate_dataset(args.out, args.data, out=args.out, device=args.device)
        update_card(args.out, metrics={"per_image_val": _card_metrics(metrics)})
        print(metrics.table())
    print(f"model card: {card}")
    return 0


def _card_metrics(m: Metrics) -> dict:
    return {
        "images": m.n,
        "accuracy": round(float(m.accuracy), 4),
        "kappa": round(float(m.kappa), 4),
        "kappa_ci95": [round(float(x), 4) for x in m.kappa_ci95],
        "kappa_p": float(m.kappa_p),
        "per_class": {
            c.label: {
                k: round(float(getattr(c, k)), 4)
                for k in ("support", "sensitivity", "specificity", "ppv", "npv", "youden")
            }
            for c in m.per_class
        },
        "confusion": [list(r) for r in m.confusion],
        "labels": list(m.labels),
    }


def cmd_evaluate(args: argparse.Namespace) -> int:
    from node.training.evaluate import evaluate_dataset

    if args.studies:
        from node.training.evaluate import evaluate_studies

        studies = _studies_in([args.studies])
        if not studies:
            raise ValueError(f"{args.studies}: no phantom studies (folders with truth.json)")
        metrics, extra = evaluate_studies(
            args.model,
            studies,
            out=args.out,
            device=args.device,
            rule_below_vote=args.rule_below_vote,
        )
        print(
            f"per disc level: {extra['levels_found']}/{extra['levels']} levels found (within 10 mm), "
            f"{extra['levels_named']} of them named right; exact class sets {extra['exact_class_sets']}/{extra['levels']}"
        )
        for cls, bins in extra["sensitivity_by_size"].items():
            print(
                f"{cls} found, by size: "
                + ", ".join(f"{k} {v['found']}/{v['lesions']}" for k, v in bins.items())
            )
        print(metrics.table())
        s = extra["schmorl_present_vs_absent"]
        print(
            f"Schmorl's node present/absent: sensitivity {s['per_class'][0]['sensitivity']:.3f}, "
            f"specificity {s['per_class'][0]['specificity']:.3f}"
        )
        return 0
    if not args.data:
        print("idaics evaluate: give --data DATA.yaml", file=sys.stderr)
        return 2
    metrics, _ = evaluate_dataset(
        args.model, args.data, split=args.split, out=args.out, device=args.device
    )
    print(metrics.table())
    if args.out:
        print(f"written: {args.out / 'metrics.json'}, {args.out / 'confusion_matrix.png'}")
    return 0


def cmd_metrics(args: argparse.Namespace) -> int:
    from node.training.metrics import compute, parse_confusion

    labels = [x.strip() for x in args.labels.split(",")]
    m = compute(parse_confusion(args.confusion), labels)
    print(json.dumps(m.to_dict(), indent=1) if args.json else m.table())
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    from node.analysis.report import table, write_json, write_previews
    from node.analysis.study import analyze_volume
    from node.analysis.volume import VolumeError, load_folder
    from node.inference.model import load_model
    from node.outputs import OutputSettings, build_outputs, write_outputs

    if not args.dicom_dir.is_dir():
        raise FileNotFoundError(f"{args.dicom_dir}: not a folder")
    model = load_model(args.model, args.device)
    objects = tuple(o.strip() for o in args.objects.split(",") if o.strip() and o.strip() != "none")
    settings = OutputSettings(objects=objects)  # checks the names before the analysis runs
    try:
        vol = load_folder(args.dicom_dir)
        result = analyze_volume(vol, model)
    except VolumeError as exc:
        print(f"idaics analyze: cannot analyse {args.dicom_dir}: {exc}", file=sys.stderr)
        return 3
    written = []
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        write_json(result, args.out / "result.json")
        write_previews(result, vol, args.out / "previews", model.card.windowing, model.card.views)
        written = [args.out / "result.json", args.out / "previews"]
        if objects:
            outputs = build_outputs(result, vol, model.card, settings)
            written += write_outputs(outputs, args.out / "dicom")
    if args.json:
        print(json.dumps(result.to_dict(), indent=1))
    else:
        print(table(result))
        for path in written:
            print(f"written: {path}")
    return 0


# -- the service ---------------------------------------------------------------------------
def _settings(args: argparse.Namespace) -> Settings:
    from node.config import load_settings

    return load_settings(args.config)


#: Files and folders the node makes (spool, database, outbox, logs) are its own: patients'
#: images are no one else's to read on the host.
PRIVATE_UMASK = 0o077


def cmd_db(args: argparse.Namespace) -> int:
    from node import migrations
    from node.db import make_engine

    settings = _settings(args)
    engine = make_engine(settings.database_url, upgrade=False)
    try:
        if args.action == "current":
            with engine.connect() as conn:
                rev = migrations.current(conn)
            state = "current" if rev == migrations.HEAD else f"this release needs {migrations.HEAD}"
            print(f"{settings.database_url}: revision {rev or 'none'} ({state})")
            return 0
        print(migrations.upgrade(engine).describe())
        return 0
    except migrations.MigrationError as exc:
        print(f"idaics db {args.action}: error: {exc}", file=sys.stderr)
        return 2
    finally:
        engine.dispose()


def cmd_models(args: argparse.Namespace) -> int:
    from node.registry import GateError, Registry

    settings = _settings(args)
    reg = Registry(settings)
    cases = args.cases or settings.corrections.cases_dir
    try:
        if args.action == "list":
            from node.inference.model import read_card

            live = reg.live_name()
            for name, folder in reg.folders().items():
                card = read_card(folder)
                score = reg.score(name)
                fig = score.line().split(": ", 1)[1] if score else "not scored on the test split"
                mark = "*" if name == live else " "
                views = "native" if card.native else "disc-centred"
                print(f"{mark} {name:<20} {card.version:<22} {views:<13} {fig}  [{folder}]")
            print("* live")
            return 0
        if args.action == "rollback":
            print(f"live model: {reg.rollback()}")
            return 0
        if args.action == "shadow":
            if not (args.off or args.name):
                raise GateError("idaics models shadow needs a model name, or --off")
            reg.set_shadow(None if args.off else args.name)
            print(f"shadow model: {args.name if not args.off else 'none'} (from the next job on)")
            return 0
        if args.action == "compare":
            return _print_compare(settings)
        if not args.name:
            raise GateError(f"idaics models {args.action} needs a model name")
        if args.action == "evaluate":
            print(reg.evaluate(args.name, cases, args.device).line())
            return 0
        cand, was, verdict = reg.promote(args.name, cases, force=args.force, device=args.device)
        print(f"candidate {cand.line()}\nlive was {was.line()}\n{verdict}")
        print(f"live model: {args.name} {cand.version}" + (" (forced)" if args.force else ""))
        return 0
    except GateError as exc:
        print(f"idaics models {args.action}: {exc}", file=sys.stderr)
        return 3


def cmd_cases(args: argparse.Namespace) -> int:
    """The labelled cases, their patients' split and what the radiologists changed."""
    from node.cases import CASE_FILE
    from node.training.from_cases import case_folders, chosen_splits, patient_key

    root = args.cases or _settings(args).corrections.cases_dir
    folders = case_folders(root)
    if not folders:
        print(
            f"{root}: no labelled cases yet (a radiologist's corrected SEG sent to the node makes one)"
        )
        return 0
    splits = chosen_splits(root)
    for folder in folders:
        about = json.loads((folder / CASE_FILE).read_text())
        patient = patient_key(about)
        changed = [
            f"{lv['level']} {'+'.join(lv['node_classes']) or 'none'} -> {'+'.join(lv['classes'])}"
            for lv in about["levels"]
            if lv["changed"]
        ]
        print(
            f"{folder.name}  job {about['analysed_job']} (SEG job {about['seg_job']})  "
            f"split {splits.get(patient, 'not chosen yet')}  {len(about['levels'])} levels, "
            f"changed: {', '.join(changed) or 'none'}"
            + (f"  [{len(about['problems'])} segment(s) left out]" if about["problems"] else "")
        )
    return 0


def _print_compare(settings: Settings) -> int:
    from node.db import make_engine, make_sessions
    from node.shadow import compare

    found = compare(make_sessions(make_engine(settings.database_url)))
    if not found:
        print(
            "no job has shadow results (idaics models shadow NAME runs one beside the live model)"
        )
        return 0
    for model, o in found.items():
        share = o["agree"] / o["levels"] if o["levels"] else float("nan")
        print(
            f"shadow {model}: {o['jobs']} jobs, {o['levels']} levels, agrees on {o['agree']} ({share:.1%})"
        )
        for pair, n in o["table"].items():
            print(f"  live -> shadow {pair:<28} {n}")
        if o["corrected_levels"]:
            n = o["corrected_levels"]
            print(
                f"  against the radiologists' corrections ({n} levels): live {o['live_right']}/{n}, "
                f"shadow {o['shadow_right']}/{n}"
            )
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from node.service import Node

    os.umask(PRIVATE_UMASK)
    settings = _settings(args)
    if args.workers is not None:
        settings.workers.count = args.workers
    Node(settings).serve_forever()
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    import signal
    import threading

    from node.worker import work

    os.umask(PRIVATE_UMASK)
    settings = _settings(args)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    if args.count > 1:
        from node.worker import spawn

        procs = [spawn(settings, f"idaics-worker-{i + 1}") for i in range(args.count)]
        stop.wait()
        for p in procs:
            p.terminate()
        for p in procs:
            p.join()
        return 0
    work(settings, stop, once=args.once)
    return 0


def _job_line(job: Job) -> str:
    stages = " ".join(f"{k[:4].lower()} {v:.1f}s" for k, v in (job.stage_seconds or {}).items())
    return (
        f"{job.id:>5} {job.state.value:<9} {job.study_date or '-':<8} {(job.series_description or '-')[:28]:<28} "
        f"{job.calling_aet:<16} {job.instances:>5}  {stages}  {job.reason or ''}"
    )


def cmd_jobs(args: argparse.Namespace) -> int:
    from sqlalchemy import select

    from node.analysis.report import table
    from node.db import Job, State, actor, make_engine, make_sessions
    from node.export.delivery import deliver_due
    from node.jobs import resend, retry

    settings = _settings(args)
    sessions = make_sessions(make_engine(settings.database_url))
    with sessions() as s:
        if args.jobs_command == "list":
            q = select(Job).order_by(Job.id.desc()).limit(args.limit)
            if args.state:
                q = q.where(Job.state == State(args.state.upper()))
            print(
                f"{'id':>5} {'state':<9} {'date':<8} {'series':<28} {'calling AE':<16} {'inst':>5}  stages  reason"
            )
            for job in s.execute(q).scalars():
                print(_job_line(job))
            return 0
        job = s.get(Job, args.id)
        if job is None:
            raise ValueError(f"no job {args.id}")
        if args.jobs_command == "show":
            print(_job_line(job))
            print(
                f"study {job.study_uid}\nseries {job.series_uid}\noutputs {job.outputs_dir or '-'}"
            )
            if job.result:
                print(table(job.result))
            for d in job.deliveries:
                print(
                    f"delivery {d.id} to {d.destination} ({d.address}): {d.state.value}, {d.attempts} attempt(s)"
                    f"{', last error: ' + d.last_error if d.last_error else ''}"
                )
            for e in job.events:
                print(f"  {e.at:%Y-%m-%d %H:%M:%S} {e.actor:<24} {e.event:<20} {e.detail or ''}")
            return 0
        if args.jobs_command == "retry":
            retry(s, job, f"cli:{actor()}")
            s.commit()
            print(f"job {job.id} queued again")
            return 0
        fresh = resend(s, job, f"cli:{actor()}")
        s.commit()
    sent = deliver_due(sessions, settings, f"cli:{actor()}", args.id)
    print(f"job {args.id}: {sent} of {len(fresh)} deliveries sent now; the node retries the others")
    return 0 if sent == len(fresh) else 1


def cmd_echo(args: argparse.Namespace) -> int:
    from node.export.scu import SendError, echo, parse_peer

    dest = parse_peer(args.address)
    try:
        status = echo(dest, args.calling_aet)
    except SendError as exc:
        print(f"idaics echo: {exc}", file=sys.stderr)
        return 1
    print(f"C-ECHO {args.address}: status 0x{status:04X}{' (success)' if status == 0 else ''}")
    return 0 if status == 0 else 1


def cmd_send(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from node.export.scu import SendError, parse_peer, send_files

    dest = parse_peer(args.address)
    paths = sorted(p for p in args.folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    if not paths:
        raise FileNotFoundError(f"{args.folder}: no files to send")
    with tqdm(total=len(paths), unit="file", desc=f"to {dest.ae_title}") as bar:
        try:
            n = send_files(paths, dest, args.calling_aet, progress=lambda p, status: bar.update(1))
        except SendError as exc:
            print(f"idaics send: {exc}", file=sys.stderr)
            return 1
    print(f"{n} instances stored at {args.address}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from node.demo import run_demo

    return run_demo(
        home=args.home, slices=args.slices, pacs=args.pacs, keep_running=args.keep_running
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="idaics", description="IDAICS lumbar disc node")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument(
        "--config",
        type=Path,
        default=None,
        help="node configuration (default: $IDAICS_CONFIG, else config/node.toml)",
    )
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser(
        "synth", help="generate phantom lumbar CT studies with known disc conditions"
    )
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--studies", type=int, default=1)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--slices", type=int, default=None, help="force the slice count (150-500)")
    s.add_argument(
        "--co-occurrence",
        type=float,
        default=0.15,
        help="rate of a Schmorl's node beside a bulge or protrusion",
    )
    s.add_argument("--workers", type=int, default=1)
    s.add_argument(
        "--base",
        type=Path,
        help="a real CT (NIfTI, HU) to insert disc lesions into, instead of phantoms",
    )
    s.add_argument("--base-labels", type=Path, help="vertebra label map of --base, on its grid")
    s.add_argument(
        "--label-scheme", choices=["totalsegmentator", "verse"], default="totalsegmentator"
    )
    s.add_argument(
        "--base-name", help="name of the base CT in study folders (default: its file name)"
    )
    s.add_argument("--pictures", type=Path, help="with --base: write before/after pictures here")
    s.add_argument(
        "--levels",
        help="with --base: only these levels, comma-separated (default: every level whose two "
        "bodies are labelled and in view)",
    )
    s.set_defaults(func=cmd_synth)

    r = sub.add_parser(
        "render", help="axial and sagittal pictures of phantom studies with truth overlays"
    )
    r.add_argument("studies", type=Path, nargs="+", help="study folders or folders of studies")
    r.add_argument("--out", type=Path, default=Path("previews"))
    r.set_defaults(func=cmd_render)

    d = sub.add_parser("dataset", help="training datasets")
    dsub = d.add_subparsers(dest="dataset_command", required=True)
    b = dsub.add_parser("build", help="build a YOLO-seg dataset")
    b.add_argument("--source", choices=["phantoms", "labelme", "seg", "cases"], default="phantoms")
    b.add_argument(
        "input",
        type=Path,
        nargs="+",
        help="phantom study folders, LabelMe folders, DICOM SEG files/folders, or the node's "
        "cases folder (corrections.cases_dir)",
    )
    b.add_argument("--out", type=Path, required=True)
    b.add_argument(
        "--mapping", type=Path, help="YAML/JSON: source label name -> class (labelme, seg)"
    )
    b.add_argument(
        "--ct", type=Path, nargs="*", default=[], help="CT series folders for --source seg"
    )
    b.add_argument("--val-fraction", type=float, default=0.15)
    b.add_argument(
        "--test-fraction",
        type=float,
        default=0.2,
        help="cases: share of new patients put in the frozen test split (chosen once)",
    )
    b.add_argument(
        "--views",
        choices=["disc", "native"],
        default="disc",
        help="cases: disc-centred slices (as the bundled model) or whole native slices",
    )
    b.add_argument("--seed", type=int, default=0)
    b.add_argument(
        "--randomise",
        action="store_true",
        help="phantoms: jitter window, blur and noise per slice (domain randomisation)",
    )
    b.set_defaults(func=cmd_dataset_build)

    t = sub.add_parser(
        "train", help="train a YOLOv8-seg disc model (defaults follow the IDAICS paper)"
    )
    t.add_argument("--data", type=Path, required=True)
    t.add_argument("--out", type=Path, required=True, help="model folder, e.g. models/NAME")
    t.add_argument("--from", dest="from_weights", type=Path, help="weights to fine-tune from")
    t.add_argument("--epochs", type=int, default=150)
    t.add_argument("--imgsz", type=int, default=512)
    t.add_argument("--batch", type=int, default=16)
    t.add_argument("--lr0", type=float, default=0.001)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default=None, help="cpu, 0, ... (default: GPU if there is one)")
    t.add_argument("--workers", type=int, default=2)
    t.add_argument(
        "--fraction", type=float, default=1.0, help="share of the training images to use"
    )
    t.add_argument(
        "--degrees", type=float, default=0.0, help="random rotations up to this many degrees"
    )
    t.add_argument("--description", help="what the training data is, for the model card")
    t.set_defaults(func=cmd_train)

    a = sub.add_parser("analyze", help="find and classify the discs of one CT series")
    a.add_argument("dicom_dir", type=Path)
    a.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    a.add_argument("--out", type=Path)
    a.add_argument("--json", action="store_true", help="print the result as JSON")
    a.add_argument("--device", default=None)
    a.add_argument(
        "--objects",
        default=",".join(DEFAULT_OBJECTS),
        help=f"DICOM objects written under OUT/dicom: any of {','.join(OBJECTS)}, or none",
    )
    a.set_defaults(func=cmd_analyze)

    e = sub.add_parser(
        "evaluate", help="per-image metrics on a dataset split, or per-disc on phantom studies"
    )
    e.add_argument("--model", type=Path, required=True)
    e.add_argument("--data", type=Path)
    e.add_argument(
        "--studies", type=Path, help="per-disc evaluation against truth.json (needs analyze)"
    )
    e.add_argument("--split", default="val", choices=["train", "val"])
    e.add_argument("--out", type=Path)
    e.add_argument("--device", default=None)
    e.add_argument(
        "--rule-below-vote",
        type=float,
        metavar="VOTE",
        help="with --studies: the 25%% rule decides a disc's shape where the model's vote is "
        "under VOTE (default 0.4, and 0.55 where the disc's margin reads bulge or protrusion; "
        "0: the model alone; above 1: the rule alone, wherever it can be read)",
    )
    e.set_defaults(func=cmd_evaluate)

    cal = sub.add_parser(
        "calibrate", help="fit a model's confidence calibration on held-out studies"
    )
    cal.add_argument("--model", type=Path, required=True)
    cal.add_argument(
        "--studies",
        type=Path,
        nargs="+",
        required=True,
        help="studies with truth.json (or folders of them)",
    )
    cal.add_argument("--device", default=None)
    cal.add_argument("--description", help="what the studies are, for the card")
    cal.set_defaults(func=cmd_calibrate)

    m = sub.add_parser(
        "metrics", help="accuracy, kappa and per-class metrics from a confusion matrix"
    )
    m.add_argument("--confusion", required=True, help='rows true, columns predicted: "19,2;2,26"')
    m.add_argument("--labels", required=True, help="comma-separated class labels in matrix order")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=cmd_metrics)
    db = sub.add_parser("db", help="the node's database: its schema revision, and upgrading it")
    db.add_argument(
        "action",
        choices=["upgrade", "current"],
        help="upgrade: bring the schema to this release's (a SQLite file is copied aside first); "
        "current: say which revision it is at",
    )
    db.set_defaults(func=cmd_db)
    ca = sub.add_parser("cases", help="the labelled cases made of radiologists' corrections")
    ca.add_argument("action", choices=["list"])
    ca.add_argument("--cases", type=Path, default=None, help="default: corrections.cases_dir")
    ca.set_defaults(func=cmd_cases)
    mo = sub.add_parser(
        "models",
        help="the model registry: list, evaluate on the frozen test split, promote, rollback",
    )
    mo.add_argument(
        "action", choices=["list", "evaluate", "promote", "rollback", "shadow", "compare"]
    )
    mo.add_argument("name", nargs="?", help="a model of the registry (evaluate, promote, shadow)")
    mo.add_argument("--off", action="store_true", help="shadow: stop the shadow model")
    mo.add_argument(
        "--cases", type=Path, default=None, help="labelled cases (default: corrections.cases_dir)"
    )
    mo.add_argument("--force", action="store_true", help="promote even when the gate refuses")
    mo.add_argument("--device", default=None)
    mo.set_defaults(func=cmd_models)
    sv = sub.add_parser(
        "serve", help="run the node: DICOM listener, scheduler, workers, admin page"
    )
    sv.add_argument(
        "--workers", type=int, default=None, help="worker processes (overrides the configuration)"
    )
    sv.set_defaults(func=cmd_serve)

    wk = sub.add_parser(
        "worker", help="run workers alone, against the configured database and spool"
    )
    wk.add_argument("--count", type=int, default=1)
    wk.add_argument("--once", action="store_true", help="run at most one job, then exit")
    wk.set_defaults(func=cmd_worker)

    jb = sub.add_parser("jobs", help="list, show, retry and resend jobs")
    jsub = jb.add_subparsers(dest="jobs_command", required=True)
    jl = jsub.add_parser("list")
    jl.add_argument(
        "--state",
        choices=[
            s.lower()
            for s in ("RECEIVING", "QUEUED", "RUNNING", "SENDING", "DONE", "FAILED", "SKIPPED")
        ],
    )
    jl.add_argument("--limit", type=int, default=50)
    for name in ("show", "retry", "resend"):
        x = jsub.add_parser(name)
        x.add_argument("id", type=int)
    jb.set_defaults(func=cmd_jobs)

    ec = sub.add_parser("echo", help="C-ECHO a DICOM node")
    ec.add_argument("address", help="AE@HOST:PORT")
    ec.add_argument("--calling-aet", default="IDAICS")
    ec.set_defaults(func=cmd_echo)

    se = sub.add_parser("send", help="C-STORE every file of a folder to a DICOM node")
    se.add_argument("folder", type=Path)
    se.add_argument("address", help="AE@HOST:PORT")
    se.add_argument("--calling-aet", default="IDAICS")
    se.set_defaults(func=cmd_send)

    dm = sub.add_parser(
        "demo", help="start a node on loopback, send it a phantom study, show what comes back"
    )
    dm.add_argument("--home", type=Path, default=Path("var/demo"))
    dm.add_argument("--slices", type=int, default=200)
    dm.add_argument(
        "--pacs",
        help="AE@HOST:PORT of a PACS (e.g. Orthanc) to receive the results; "
        "default: a receiver started by the demo",
    )
    dm.add_argument("--keep-running", action="store_true", help="keep the node running afterwards")
    dm.set_defaults(func=cmd_demo)

    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from node import logs

    logs.setup(
        logging.DEBUG if args.verbose else logging.INFO,
        logging.WARNING if args.command == "demo" and not args.verbose else None,
    )
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as exc:  # includes VolumeError, ModelError, DataError
        print(f"idaics {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
