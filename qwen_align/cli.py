"""`qwen-align`: plan and run recipes, report on and show the status of runs, build the offline Qwen2.5 tokenizer."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from . import console, distributed
from .errors import Interrupted, UserError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qwen-align", description="The Qwen2.5 post-training chain from one YAML recipe.")
    sub = p.add_subparsers(dest="command", required=True)

    plan = sub.add_parser("plan", help="print the resolved chain of a recipe")
    plan.add_argument("recipe")
    plan.add_argument("--json", action="store_true", help="print the whole resolved recipe as JSON")
    plan.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE", help="override a recipe key")
    plan.add_argument("--accelerate-config", metavar="FILE",
                      help="show the backend this accelerate config sets up (default: the launcher's environment)")

    run = sub.add_parser("run", help="run a recipe's stages (completed ones are skipped)")
    run.add_argument("recipe")
    run.add_argument("--until", metavar="NAME", help="stop after this stage")
    run.add_argument("--only", metavar="NAME[,NAME]", help="run only these stages (their inputs must exist)")
    run.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                     help="override a recipe key, e.g. stages.sft.learning_rate=1e-5")

    rep = sub.add_parser("report", help="write report.md and report.html (plots per stage) for run directories")
    rep.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="several overlay their curves, labelled by folder")
    rep.add_argument("--out", metavar="DIR", help="where the report goes (default: RUN_DIR/report; "
                     "several: the first's report-compare)")

    st = sub.add_parser("status", help="print a run directory's manifest as a table")
    st.add_argument("run_dir", metavar="RUN_DIR")

    tok = sub.add_parser("tokenizer", help="tokenizer tools")
    tok_sub = tok.add_subparsers(dest="tokenizer_command", required=True)
    build = tok_sub.add_parser("build", help="write a Qwen2.5 tokenizer folder from the BPE ranks (offline)")
    build.add_argument("--out", required=True, help="folder to write (loadable by AutoTokenizer)")
    build.add_argument("--tiktoken", help="qwen.tiktoken ranks file; default: the one shipped in dashscope")

    ev = sub.add_parser("eval-rm", help="evaluate a reward model on RewardBench 1/2, RMB, PPE or preference pairs")
    ev.add_argument("--model", help="reward-model checkpoint folder (AutoModelForSequenceClassification, 1 output)")
    ev.add_argument("--benchmark", required=True, choices=["rewardbench", "rewardbench2", "rmb", "ppe", "pairs"])
    ev.add_argument("--data", help="the benchmark as released: a JSON/JSONL/Parquet file, save_to_disk folder, "
                                   "or a folder read recursively")
    ev.add_argument("--out", help="folder for summary.json and scores.jsonl (per-example scores)")
    ev.add_argument("--max-length", type=int, default=4096, help="tokens per scored conversation; longer ones "
                                                                 "are cut from the left (default 4096)")
    ev.add_argument("--batch-size", type=int, default=8, help="conversations per forward pass (default 8)")
    ev.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                    help="auto: bfloat16 on a GPU that has it, else float32")
    ev.add_argument("--scores-file", help="re-score a saved scores.jsonl without a model")
    return p


def _plan(args) -> None:
    from .distributed import config_backend, launch_backend
    from .recipe import load_recipe

    recipe = load_recipe(args.recipe, args.set)
    backend = config_backend(args.accelerate_config) if args.accelerate_config else launch_backend()
    if args.json:
        out = recipe.resolved_json()
        for stage, raw in zip(recipe.stages, out["stages"]):
            if stage.trains:
                raw["effective_global_batch"] = stage.global_batch(recipe.num_processes)
        print(json.dumps(out, indent=2))
        return
    print(f"recipe {recipe.source}: model {recipe.model}, run_dir {recipe.run_dir}, seed {recipe.seed}, "
          f"{recipe.num_processes} process(es)")
    mismatch = "" if backend.world_size == recipe.num_processes else f"; the recipe plans for {recipe.num_processes}"
    print(f"backend: {backend.describe()}{mismatch}")
    for i, stage in enumerate(recipe.stages, 1):
        start = stage.init_from or f"{recipe.model} (recipe model)"
        print(f"{i}. {stage.name} [{stage.kind}] from {start}")
        if stage.data:
            sources = ", ".join(f"{s.describe()} x{s.weight:g}" for s in stage.data.sources)
            print(f"   data: {sources}")
        params = "  ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in stage.key_hyperparameters().items())
        print(f"   {params}")
        if stage.trains:
            print(f"   global batch: {stage.batch_arithmetic(recipe.num_processes)}")
            if recipe.integrations(stage):
                print(f"   report_to: {', '.join(recipe.integrations(stage))}")


def _run(args) -> None:
    from .recipe import load_recipe
    from .runner import run_recipe

    recipe = load_recipe(args.recipe, args.set, world_size=distributed.world_size())
    only = [n.strip() for n in args.only.split(",") if n.strip()] if args.only else None
    manifest = run_recipe(recipe, until=args.until, only=only)
    run_dir = Path(recipe.run_dir).resolve()
    print(f"manifest: {run_dir / 'manifest.json'}")
    if distributed.is_main():
        print(console.summary_table(manifest))
        report = _report_after_run(run_dir)
        if report:
            print(f"report: {report / 'report.html'}")


def _report_after_run(run_dir: Path) -> Path | None:
    """The run's report, written at the end of `run`; a report that cannot be drawn warns and the run stands."""
    from .report import write_report

    try:
        return write_report([run_dir])
    except Exception as e:  # noqa: BLE001 - the stages' outputs and the manifest are what the run is for
        logging.getLogger("qwen_align.report").warning("the report was not written (%s: %s); run `qwen-align report "
                                                       "%s` to retry", type(e).__name__, e, run_dir)
        return None


def _report(args) -> None:
    from .report import write_report

    out = write_report(args.run_dirs, args.out)
    print(f"wrote {out / 'report.md'} and {out / 'report.html'}")


def _status(args) -> None:
    from .report import read_manifest

    manifest = read_manifest(args.run_dir)
    print(f"{args.run_dir}: recipe {manifest.get('recipe', '?')}, updated {manifest.get('updated_at', '?')}")
    print(console.status_table(manifest))


def _tokenizer_build(args) -> None:
    from .tokenizer import build_qwen25_tokenizer, save_tokenizer

    tok = build_qwen25_tokenizer(args.tiktoken)
    save_tokenizer(tok, args.out)
    ids = tok("Hello world!")["input_ids"]
    print(f"wrote {args.out}: {len(tok)} tokens; 'Hello world!' -> {ids}")


def _eval_rm(args) -> None:
    from .rm_eval.report import evaluate, print_summary, rescore

    if args.scores_file:
        summary = rescore(args.scores_file, args.benchmark, args.out)
    else:
        if not args.model or not args.data:
            raise UserError("eval-rm: give --model and --data (or --scores-file to re-score saved scores)")
        if args.max_length <= 0 or args.batch_size <= 0:
            raise UserError("eval-rm: --max-length and --batch-size must be positive")
        summary = evaluate(args.model, args.benchmark, args.data, args.out, args.max_length, args.batch_size,
                           args.dtype)
    print_summary(summary)
    if args.out:
        print(f"wrote {Path(args.out) / 'summary.json'}" + ("" if args.scores_file else " and scores.jsonl"))


def _one_voice() -> None:
    """Under several processes only the main rank prints progress; the others keep their errors (stderr)."""
    if distributed.is_main():
        return
    sys.stdout = open(os.devnull, "w")
    os.environ["TQDM_DISABLE"] = "1"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        if args.command == "plan":
            _plan(args)
        elif args.command == "run":
            # Once, before any Trainer, with the long timeout: a rank may wait while another writes a checkpoint.
            distributed.init()
            _one_voice()
            console.quiet_libraries()
            _run(args)
        elif args.command == "report":
            _report(args)
        elif args.command == "status":
            _status(args)
        elif args.command == "tokenizer":
            _tokenizer_build(args)
        elif args.command == "eval-rm":
            _eval_rm(args)
    except UserError as e:
        where = distributed.rank_label() if args.command == "run" else ""  # only `run` starts ranks
        print(f"error: {where}{e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return 0
    except Interrupted as e:  # SIGTERM/SIGINT during training: a checkpoint was saved at step e.step
        print(e, file=sys.stderr)
        return 143 if e.signal_name == "SIGTERM" else 130
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except Exception as e:
        if not distributed.is_distributed():
            raise  # one process: the traceback
        # Several: one line naming the rank (the traceback is in its stage log); the launcher then ends the others.
        print(f"error: {distributed.rank_label()}{type(e).__name__}: {e}".splitlines()[0], file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
