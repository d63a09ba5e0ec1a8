"""The `promptbake` command line: a thin layer over the library.

Every user error becomes one line on stderr and exit code 2; never a traceback.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from promptbake.errors import PromptbakeError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Bake a system prompt into a LoRA adapter (OPCD).")
console = Console(stderr=True)
out = Console()


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", category=UserWarning, module="peft")
    warnings.filterwarnings("ignore", category=FutureWarning)


def friendly(fn):
    """Run a command; PromptbakeError -> one line + exit 2, Ctrl-C -> exit 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except PromptbakeError as e:
            console.print(f"[bold red]error:[/] {e}", markup=True, highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            console.print("interrupted (an interrupted compile resumes from its last checkpoint when run again)")
            raise typer.Exit(130) from None

    return wrapper


def _comma_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _rate_table(title: str, rates: dict[str, dict[str, float]]) -> Table:
    table = Table(title=title)
    conds = list(rates)
    table.add_column("check")
    for cond in conds:
        table.add_column(cond, justify="right")
    if "teacher" in rates and "baked" in rates:
        table.add_column("baked/teacher", justify="right")
    names = list(next(iter(rates.values())).keys()) if rates else []
    for name in names:
        row = [name] + [f"{rates[c][name]:.0%}" for c in conds]
        if "teacher" in rates and "baked" in rates:
            t = rates["teacher"][name]
            row.append(f"{rates['baked'][name] / t:.2f}" if t > 0 else "n/a")
        table.add_row(*row)
    return table


def _cap_line(m) -> str:
    """The response cap and how often it cut an answer: never silent."""
    how = "sized from the prompted teacher's answers" if m.response_lengths.get("source") == "auto" else "set"
    hits = m.cap_hit
    parts = [f"{label} {hits[key]:.0%}" for key, label in (
        ("train_rollouts", "training rollouts"), ("heldout_after", "held-out samples after training"),
        ("greedy_teacher", "teacher's greedy answers"), ("greedy_baked", "baked greedy answers")) if key in hits]
    cut = f"; cut by it: {', '.join(parts)}" if parts else ""
    return f"response cap: {m.response_cap} tokens ({how}){cut}"


def _option_for(name: str, field) -> tuple[object, str]:
    """(typer annotation, help) for one BakeConfig field: every option defaults to None, meaning "not set here",
    so the prompt file's `train:` block and the preset still apply; BakeConfig validates what is given."""
    import typing

    from pydantic_core import PydanticUndefined

    annotation = field.annotation
    default = field.default if field.default is not PydanticUndefined else field.default_factory()
    help_text = (field.description or "").strip()
    if default is not None:
        help_text += f" [default: {','.join(default) if isinstance(default, list) else default}]"
    flag = "--" + name.replace("_", "-")
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if annotation is bool or args == [bool]:  # bool | None: unset leaves the choice to the config (torch_compile)
        return Annotated[Optional[bool], typer.Option(f"{flag}/--no-{name.replace('_', '-')}", help=help_text, show_default=False)], help_text
    if typing.get_origin(annotation) is typing.Literal:
        help_text = f"{' | '.join(map(str, typing.get_args(annotation)))}. {help_text}"
        kind: type = str
    elif annotation in (int, float) or (len(args) == 1 and args[0] in (int, float)):
        # read as text so that BakeConfig parses it: `--steps many` gets the same one-line error as `steps: many`
        number = annotation if annotation in (int, float) else args[0]
        return Annotated[Optional[str], typer.Option(flag, help=help_text, show_default=False,
                                                     metavar=number.__name__.upper())], help_text
    else:  # max_new_tokens (integer or auto), lora_targets (comma list)
        kind = str
    return Annotated[Optional[kind], typer.Option(flag, help=help_text, show_default=False)], help_text


def with_config_options(command):
    """Add one option per `BakeConfig` field to `command`, which receives them as `overrides` (a dict).

    The config is the single source: a new field is a new option, its description the option's help."""
    import inspect

    from promptbake.config import BakeConfig

    fields = BakeConfig.model_fields
    signature = inspect.signature(command, eval_str=True)
    own = [p for p in signature.parameters.values() if p.name != "overrides"]
    clash = {p.name for p in own} & set(fields)
    assert not clash, f"options {clash} are both explicit and config fields"
    generated = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=_option_for(name, field)[0])
        for name, field in fields.items()
    ]

    @functools.wraps(command)
    def wrapper(**kwargs):
        overrides = {name: kwargs.pop(name) for name in fields}
        if isinstance(overrides.get("lora_targets"), str):
            overrides["lora_targets"] = _comma_list(overrides["lora_targets"])
        return command(**kwargs, overrides=overrides)

    wrapper.__signature__ = signature.replace(parameters=[*own, *generated])
    wrapper.__annotations__ = {p.name: p.annotation for p in wrapper.__signature__.parameters.values()}
    return wrapper


@app.command("compile")
@friendly
@with_config_options
def compile_cmd(
    prompt: Annotated[Path, typer.Argument(help="Prompt file (Markdown with optional YAML front matter).")],
    out_dir: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output folder (default build/<name>).")] = None,
    queries: Annotated[Optional[Path], typer.Option(help="Query file (.jsonl/.txt/.csv); default from front matter.")] = None,
    model: Annotated[Optional[str], typer.Option(help="Base model: default name, HF folder, .gguf file or hub id.")] = None,
    heldout_queries: Annotated[Optional[Path], typer.Option(
        help="Separate held-out query file, only measured on; default from the front matter's heldout:.")] = None,
    var: Annotated[list[str], typer.Option("--var", help="Template variable key=value (repeatable).")] = [],
    force: Annotated[bool, typer.Option(help="Rebuild even if up to date; replace an output that is not this prompt's.")] = False,
    restart: Annotated[bool, typer.Option(help="Ignore the checkpoint of an interrupted compile (or of a shorter one to continue from) and start over.")] = False,
    make_report: Annotated[bool, typer.Option("--report", help="Write report.html/report.md into the output.")] = False,
    trust_pickle: Annotated[bool, typer.Option(help="Allow pickle (.bin) weights.")] = False,
    continue_from: Annotated[Optional[Path], typer.Option(
        help="Output folder of an earlier compile with the same settings but fewer steps: train on from its last "
             "checkpoint (kept beside it) instead of from step 1, into --out. Rerunning with more --steps into the "
             "same --out does this by itself.")] = None,
    *,
    overrides: dict,
) -> None:
    """Bake PROMPT into a LoRA adapter with on-policy context distillation."""
    _quiet_libraries()
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from promptbake.plan import plan_compile
    from promptbake.spec import parse_var_overrides

    variables = parse_var_overrides(var)
    plan = plan_compile(prompt, out=out_dir, queries=queries, model=model, overrides=overrides,
                        variables=variables, trust_pickle=trust_pickle, heldout=heldout_queries,
                        continue_from=continue_from)
    plan.resolve(on_event=lambda event: console.print(f"[dim]{event.message}[/]", highlight=False))
    if plan.existing(force) == "up-to-date":
        manifest = plan.cached_manifest()
        out.print(f"[bold green]up to date[/] {manifest.name} -> {plan.out_dir} (same prompt, model, queries and config)")
        return
    from promptbake.bake import compile_prompt
    from promptbake.events import Notice, StepDone, TrainingStarted

    progress = Progress(
        TextColumn("[bold]step {task.completed}/{task.total}"),
        BarColumn(),
        TextColumn("KL {task.fields[kl]:.4f}  {task.fields[tps]:.0f} tok/s"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
    )
    task = progress.add_task("train", total=plan.config.steps, kl=float("nan"), tps=0.0)
    interactive = console.is_terminal

    def on_event(event) -> None:
        """Stages and notices as lines; training as a live bar on a terminal, every tenth step in a log."""
        if isinstance(event, StepDone):
            e = event.entry
            progress.update(task, completed=e.step, kl=e.kl, tps=e.tokens_per_s)
            if e.skipped:
                console.print(f"[yellow]warning: step {e.step}: the gradient was not finite, its update was skipped[/]",
                              highlight=False)
            elif not interactive and (e.step == 1 or e.step % 10 == 0 or e.step == event.steps):
                console.print(event.message, highlight=False)
            return
        if progress.live.is_started:
            progress.stop()
        if isinstance(event, Notice) and event.warning:
            console.print(f"[yellow]warning: {event.message}[/]", highlight=False)
        else:
            console.print(f"[dim]{event.message}[/]", highlight=False)
        if isinstance(event, TrainingStarted):
            progress.update(task, completed=event.first_step - 1)
            if interactive:
                progress.start()

    try:
        result = compile_prompt(plan, force=force, restart=restart, on_event=on_event)
    finally:
        if progress.live.is_started:
            progress.stop()
    if not result.main_process:  # under `accelerate launch`: the main process reports
        return
    m = result.manifest
    summary = m.loss_summary
    out.print(f"[bold green]baked[/] {m.name} -> {result.out_dir}")
    out.print(
        f"train: {summary.get('steps')} steps in {summary.get('seconds', 0):.0f} s "
        f"({summary.get('median_step_seconds', 0):.2f} s/step, {summary.get('tokens_per_s', 0):.0f} tokens/s), "
        f"precision {m.precision}"
        + (f"; updates skipped (gradient not finite) at steps {summary['skipped_steps']}" if summary.get("skipped_steps") else "")
    )
    out.print(_cap_line(m))
    held_from = f"{m.heldout_file}" if m.heldout_file else f"{len(m.heldout_ids)} queries split off {m.queries_file}"
    if m.heldout_kl_before is not None:
        gap = 1 - m.heldout_kl_after / m.heldout_kl_before if m.heldout_kl_before else float("nan")
        out.print(f"held-out reverse KL to the prompted teacher ({held_from}): {m.heldout_kl_before:.4f} -> "
                  f"{m.heldout_kl_after:.4f} ({gap:.0%} of the gap closed)")
    if m.check_rates and any(m.check_rates.values()):
        out.print(_rate_table(f"checks on {len(m.heldout_ids)} held-out queries (greedy)", m.check_rates))
    out.print(f"prompt tokens saved per request: {m.prompt_tokens}")
    if make_report:
        from promptbake.report import build_report

        out.print(f"report: {build_report(result.out_dir)[0]}")


@app.command("queries")
@friendly
def queries_cmd(
    prompt: Annotated[Path, typer.Argument(help="Prompt file to write queries for.")],
    out_file: Annotated[Path, typer.Option("--out", "-o", help="Output query file (.jsonl).")],
    n: Annotated[int, typer.Option("-n", help="Number of queries.")] = 500,
    turns: Annotated[int, typer.Option(help="1: single messages; 2: a first turn answered by the prompted teacher, "
                                            "then the follow-up query.")] = 1,
    model: Annotated[Optional[str], typer.Option(help="Base model (the prompted teacher; default generator).")] = None,
    generator: Annotated[Optional[str], typer.Option(help="Another local model to write the queries.")] = None,
    generator_url: Annotated[Optional[str], typer.Option(help="An OpenAI-compatible endpoint to write the queries.")] = None,
    exclude: Annotated[Optional[Path], typer.Option(
        help="Query file whose (near-)copies are dropped; default the prompt's heldout: file.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the sampling and of the rule order.")] = 0,
    temperature: Annotated[float, typer.Option(help="Generator sampling temperature.")] = 0.8,
    off_topic: Annotated[float, typer.Option(help="Share of off-topic messages.")] = 0.1,
    var: Annotated[list[str], typer.Option("--var", help="Template variable key=value (repeatable).")] = [],
    force: Annotated[bool, typer.Option(help="Replace an existing output file.")] = False,
    trust_pickle: Annotated[bool, typer.Option(help="Allow pickle (.bin) weights.")] = False,
) -> None:
    """Write user queries that exercise each rule of PROMPT, tagged with the rule (JSONL)."""
    _quiet_libraries()
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from promptbake.atomic import write_text_atomic
    from promptbake.queries import load_queries
    from promptbake.spec import load_spec, parse_var_overrides
    from promptbake.synthesis import SynthesisSettings, diversity, records_to_jsonl, synthesize_for_prompt

    settings = SynthesisSettings(n=n, turns=turns, seed=seed, temperature=temperature, off_topic=off_topic)
    settings.validate()
    if out_file.suffix.lower() != ".jsonl":
        raise PromptbakeError(f"{out_file}: the output must be a .jsonl file (it holds rule tags and conversations)")
    if out_file.exists() and not force:
        raise PromptbakeError(f"{out_file}: exists; pass --force to replace it")
    spec = load_spec(prompt, parse_var_overrides(var))
    exclude_path = exclude or spec.heldout_path
    excluded = load_queries(exclude_path) if exclude_path else []
    progress = Progress(TextColumn("[bold]writing queries"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=console)
    with progress:
        task = progress.add_task("queries", total=n)
        result = synthesize_for_prompt(spec.system_prompt, model=model or spec.model, generator=generator,
                                       generator_url=generator_url, settings=settings, exclude=excluded,
                                       on_progress=lambda done, total: progress.update(task, completed=done),
                                       trust_pickle=trust_pickle)
    write_text_atomic(out_file, records_to_jsonl(result.records))
    figures = diversity([" ".join(m["content"] for m in r["messages"] if m["role"] == "user") if "messages" in r
                         else r["query"] for r in result.records])
    source = "from cache" if result.cached else f"{result.attempts} generated, {result.rejected}"
    out.print(f"wrote {len(result.records)} queries to {out_file} ({source}); rules covered "
              f"{result.rules_covered}/{len(result.rules)}; distinct 2-grams {figures['distinct_2']:.2f}"
              + (f"; excluded near-copies of {exclude_path}" if exclude_path else ""))
    if len(result.records) < n:
        console.print(f"[yellow]warning: only {len(result.records)} of {n} distinct usable queries "
                      f"after {settings.max_rounds} rounds[/]")


@app.command("learn")
@friendly
def learn_cmd(
    suite: Annotated[str, typer.Option(help="A suite with gold answers (gsm8k, medmcqa, mmlu, ...).")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Output folder (knowledge.md, adapter/, learn.json).")],
    train_limit: Annotated[int, typer.Option(help="Training tasks the model learns from.")] = 64,
    heldout_limit: Annotated[int, typer.Option(help="Held-out tasks every stage is measured on.")] = 100,
    rounds: Annotated[int, typer.Option(help="Extract-and-accumulate rounds (the training tasks are split among them).")] = 2,
    knowledge_tokens: Annotated[int, typer.Option(help="Token budget of the knowledge text.")] = 400,
    data: Annotated[Optional[Path], typer.Option(help="Dataset root (default $PROMPTBAKE_DATA).")] = None,
    model: Annotated[Optional[str], typer.Option(help="Base model (default the built-in one).")] = None,
    extractor: Annotated[Optional[str], typer.Option(help="Another local model to write the lessons.")] = None,
    extractor_url: Annotated[Optional[str], typer.Option(help="An OpenAI-compatible endpoint to write the lessons.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the task split, sampling and compile.")] = 0,
    preset: Annotated[str, typer.Option(help="Compile preset for the knowledge: faithful or quick.")] = "faithful",
    force: Annotated[bool, typer.Option(help="Replace an existing output folder (only once learning succeeds).")] = False,
) -> None:
    """Learn lessons from the model's own attempts at a suite, accumulate them, and bake them into an adapter."""
    _quiet_libraries()
    from promptbake.learn import LearnSettings, learn

    if preset not in ("faithful", "quick"):
        raise PromptbakeError(f"--preset must be faithful or quick, got {preset!r}")
    settings = LearnSettings(suite=suite, train_limit=train_limit, heldout_limit=heldout_limit, rounds=rounds,
                             seed=seed, knowledge_tokens=knowledge_tokens)
    result = learn(settings, out_dir, data=data, model=model, extractor=extractor, extractor_url=extractor_url,
                   compile_overrides={"preset": preset, "seed": seed}, force=force,
                   on_event=lambda message: console.print(f"[dim]{message}[/]", highlight=False))
    table = Table(title=f"{suite}: accuracy on {result.final['heldout_tasks']} held-out tasks (95% CI)")
    for col in ("stage", "base", "base + knowledge in context", "baked (no context)", "knowledge tokens"):
        table.add_column(col, justify="left" if col == "stage" else "right")
    fmt = lambda e: f"{e['value']:.1%} [{e['ci95'][0]:.1%}, {e['ci95'][1]:.1%}]"  # noqa: E731
    for r in result.rounds:
        table.add_row(f"round {r['round']} ({r['lessons']} lessons)", fmt(r["heldout_base"]), fmt(r["heldout_in_context"]),
                      "", str(r["knowledge_tokens"]))
    f = result.final
    table.add_row("baked", fmt(f["heldout_base"]), fmt(f["heldout_in_context"]), fmt(f["heldout_baked"]),
                  str(f["knowledge_tokens"]))
    out.print(table)
    out.print(f"[bold green]learned[/] {len(result.lessons)} lessons -> {result.out_dir}/knowledge.md, adapter in "
              f"{result.out_dir}/adapter")


@app.command()
@friendly
def verify(
    adapters: Annotated[list[Path], typer.Argument(help="Baked adapter folder(s); several share one base/teacher measurement.")],
    prompt: Annotated[Optional[Path], typer.Option(help="Prompt file (default: the one in the manifest).")] = None,
    queries: Annotated[Optional[Path], typer.Option(help="Query file (default: the manifest's held-out queries).")] = None,
    min_kl_gap_closed: Annotated[Optional[float], typer.Option(help="Minimum 1 - KL(baked)/KL(base).")] = None,
    min_check_ratio: Annotated[Optional[float], typer.Option(help="Minimum baked/teacher pass rate, each check.")] = None,
    min_exact_match: Annotated[Optional[float], typer.Option(help="Minimum greedy exact-match rate with the teacher.")] = None,
    min_token_agreement: Annotated[Optional[float], typer.Option(help="Minimum greedy token agreement with the teacher.")] = None,
    max_length_change: Annotated[Optional[float], typer.Option(
        help="Largest |baked/teacher - 1| of the mean sampled answer length (0.25: within ±25 %).")] = None,
    limit: Annotated[Optional[int], typer.Option(help="Use only the first N queries.")] = None,
    agreement_tokens: Annotated[int, typer.Option(help="Tokens compared for agreement.")] = 32,
    allow_prompt_change: Annotated[bool, typer.Option(help="Compare even if the prompt changed since baking.")] = False,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the report as JSON here.")] = None,
) -> None:
    """Compare baked adapters with their prompted baseline; exit 1 when a threshold fails for any of them."""
    _quiet_libraries()
    from promptbake.atomic import write_text_atomic
    from promptbake.verify import verify_adapters

    reports = verify_adapters(
        adapters, prompt=prompt, queries=queries, allow_prompt_change=allow_prompt_change, limit=limit,
        agreement_tokens=agreement_tokens,
        thresholds=dict(min_kl_gap_closed=min_kl_gap_closed, min_check_ratio=min_check_ratio,
                        min_exact_match=min_exact_match, min_token_agreement=min_token_agreement,
                        max_length_change=max_length_change),
    )
    for report in reports:
        _print_verify(report)
    if json_out:
        body = reports[0].to_json() if len(reports) == 1 else "[\n" + ",\n".join(r.to_json() for r in reports) + "\n]"
        write_text_atomic(json_out, body + "\n")
    failed = False
    for report in reports:
        prefix = f"{report.adapter}: " if len(reports) > 1 else ""
        for failure in report.failures:
            console.print(f"[bold red]FAIL[/] {prefix}{failure}", highlight=False)
        failed |= bool(report.failures)
        if not report.failures:
            out.print(f"[bold green]PASS[/] {prefix}{len(report.thresholds)} threshold(s) hold" if report.thresholds
                      else f"{prefix}no thresholds set")
    if failed:
        raise typer.Exit(1)


def _print_verify(report) -> None:
    table = Table(title=f"verify {report.adapter} on {report.num_queries} queries (95% bootstrap CI)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, est in report.metrics.items():
        if name.startswith("answer_tokens"):
            table.add_row(name, f"{est.value:.1f} [{est.lo:.1f}, {est.hi:.1f}]")
        else:
            table.add_row(name, est.fmt(percent=name.startswith(("exact", "token"))))
    out.print(table)
    if report.checks:
        checks = Table(title="checks (greedy)")
        for col in ("check", "base", "teacher", "baked", "baked/teacher"):
            checks.add_column(col, justify="right" if col != "check" else "left")
        for name, rates in report.checks.items():
            checks.add_row(name, rates["base"].fmt(), rates["teacher"].fmt(), rates["baked"].fmt(),
                           report.check_ratios[name].fmt(percent=False))
        out.print(checks)
    if report.rules:
        rules = Table(title="per rule, worst first (its held-out queries; 95% CI)")
        for col in ("rule", "n", "gap closed", "checks t->b", "what it says"):
            rules.add_column(col, justify="right" if col in ("n", "gap closed") else "left", no_wrap=col != "what it says")
        for r in report.rules:
            gap = r.kl_gap_closed
            checks = f"{r.checks_teacher.value:.0%} -> {r.checks_baked.value:.0%}" if r.checks_teacher else "-"
            text = r.text if len(r.text) <= 48 else r.text[:45] + "..."
            rules.add_row(r.rule, str(r.num_queries), f"{gap.value:.2f} [{gap.lo:.2f}, {gap.hi:.2f}]", checks,
                          "" if r.rule == "off-topic" else text)
        out.print(rules)
    if report.cap_hit:
        cut = ", ".join(f"{k.split('_', 1)[1]} {v:.0%}" for k, v in report.cap_hit.items())
        out.print(f"answers cut by the {report.response_cap}-token cap: {cut}")


@app.command("eval")
@friendly
def eval_cmd(
    adapters: Annotated[Optional[list[Path]], typer.Argument(help="Baked adapter folders (none: base and prompted only).")] = None,
    suite: Annotated[str, typer.Option(help="Suite name in evals/ (or a suite .yaml file).")] = "medmcqa",
    data: Annotated[Optional[Path], typer.Option(help="Dataset root (default $PROMPTBAKE_DATA).")] = None,
    limit: Annotated[Optional[int], typer.Option(help="Seeded sample of N items.")] = None,
    conditions: Annotated[Optional[str], typer.Option(help="Comma list: base,prompted,<adapter name>...")] = None,
    prompt: Annotated[Optional[Path], typer.Option(help="Prompt file for the 'prompted' condition.")] = None,
    model: Annotated[Optional[str], typer.Option(help="Base model when no adapter is given.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the sample.")] = 0,
    groups: Annotated[str, typer.Option(help="all | train | test: only the train or test half of the suite's groups (subjects).")] = "all",
    export_queries: Annotated[Optional[Path], typer.Option(help="Write the selected questions (no answers) as a query JSONL to bake on, and stop.")] = None,
    batch_size: Annotated[int, typer.Option(help="Questions decoded together (CPU decoding is bound by reading weights, so larger batches are cheaper per question).")] = 16,
    precision: Annotated[Optional[str], typer.Option(help="auto | bf16 | fp32 (default: the first adapter's recorded precision, else auto).")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write results as JSON here.")] = None,
    md_out: Annotated[Optional[Path], typer.Option("--markdown", help="Write the Markdown table here.")] = None,
    rescore: Annotated[Optional[Path], typer.Option(help="Score this saved --json result again from its stored answers (no decoding) and rewrite it.")] = None,
) -> None:
    """Run an eval suite on base, base+prompt and each adapter, side by side with 95% CIs."""
    _quiet_libraries()
    import json as _json

    from promptbake.atomic import write_text_atomic
    from promptbake.evals import export_queries as write_queries
    from promptbake.evals import load_items, load_suite, run_eval
    from promptbake.evals import rescore as rescore_result

    if rescore:
        if not rescore.is_file():
            raise PromptbakeError(f"{rescore}: no such eval result")
        out.print(rescore_result(rescore, data)["markdown"], highlight=False)
        return
    if export_queries:
        items = load_items(load_suite(suite), data, limit, seed, groups)  # type: ignore[arg-type]
        out.print(f"wrote {write_queries(items, export_queries)} {suite} questions ({groups} groups) to {export_queries}")
        return
    # With --json, each finished condition's answers are kept beside it until the whole result is written, so an
    # interrupted run (Ctrl-C, a session's end) resumes at the first condition it had not finished.
    partial = json_out.parent / f".{json_out.name}.partial" if json_out else None
    result = run_eval(
        suite, list(adapters or []), data=data, limit=limit, prompt=prompt, model=model, seed=seed, groups=groups, batch_size=batch_size,
        conditions=_comma_list(conditions) if conditions else None,
        on_condition=lambda c: console.print(f"[dim]{c} done[/]"), resume=partial, precision=precision,
    )
    out.print(result["markdown"], highlight=False)
    if json_out:
        write_text_atomic(json_out, _json.dumps(result, indent=2) + "\n")
        import shutil

        shutil.rmtree(partial, ignore_errors=True)
    if md_out:
        write_text_atomic(md_out, result["markdown"] + "\n")


@app.command()
@friendly
def compare(
    prompt: Annotated[Path, typer.Argument(help="Prompt file to bake every way.")],
    methods: Annotated[str, typer.Option(help="Comma list of opcd, offpolicy, sft.")] = "opcd,offpolicy,sft",
    teacher_modes: Annotated[str, typer.Option(help="Comma list of frozen, live (sft has no live variant).")] = "frozen",
    seeds: Annotated[int, typer.Option(help="Seeds per variant (0..N-1).")] = 3,
    suites: Annotated[str, typer.Option(help="Comma list of eval suites run on every adapter ('' for none).")] = "",
    eval_limit: Annotated[str, typer.Option(help="Seeded sample of N items per suite: N, or per suite as 'N,gsm8k=40,mmlu=100'.")] = "200",
    data: Annotated[Optional[Path], typer.Option(help="Dataset root (default $PROMPTBAKE_DATA).")] = None,
    out_dir: Annotated[Optional[Path], typer.Option("--out", "-o", help="Folder for all adapters and the table (default build/compare-<name>).")] = None,
    model: Annotated[Optional[str], typer.Option(help="Base model.")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Steps of the budget-setting variant (opcd-frozen).")] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option(help="Longest sampled response.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Queries per step.")] = None,
    eval_batch_size: Annotated[int, typer.Option(help="Eval questions decoded together.")] = 16,
) -> None:
    """Bake PROMPT with each method and teacher mode at equal token budgets over seeds; one table with CIs."""
    _quiet_libraries()
    from promptbake.compare import compare_methods

    result = compare_methods(
        prompt, methods=_comma_list(methods), teacher_modes=_comma_list(teacher_modes), seeds=seeds, suites=_comma_list(suites),
        eval_limit=_eval_limits(eval_limit, _comma_list(suites)), eval_batch_size=eval_batch_size, data=data, out=out_dir, model=model,
        overrides={"steps": steps, "max_new_tokens": max_new_tokens, "batch_size": batch_size},
        on_message=lambda msg: console.print(f"[dim]{msg}[/]"),
    )
    out.print(result["markdown"], highlight=False)


def _eval_limits(text: str, suites: list[str]) -> int | dict[str, int]:
    """'200' -> 200 for every suite; '100,gsm8k=40' -> gsm8k 40, the other suites 100."""
    default, per_suite = 200, {}
    for part in _comma_list(text):
        name, _, number = part.rpartition("=")
        try:
            value = int(number)
        except ValueError:
            raise PromptbakeError(f"--eval-limit: '{part}' is not N or suite=N") from None
        if name:
            per_suite[name] = value
        else:
            default = value
    return {**{s: default for s in suites}, **per_suite} if per_suite else default


@app.command()
@friendly
def report(adapter: Annotated[Path, typer.Argument(help="Baked adapter folder.")]) -> None:
    """Write report.html and report.md into the adapter folder (add results under ADAPTER/reports/)."""
    from promptbake.report import build_report

    html_path, md_path = build_report(adapter)
    out.print(f"wrote {html_path} and {md_path}")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@friendly
def serve(
    ctx: typer.Context,
    adapters: Annotated[list[Path], typer.Argument(help="Baked adapter folders (one shared base). Extra vLLM args after --.")],
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8000,
    dry_run: Annotated[bool, typer.Option(help="Print the vllm command and exit.")] = False,
) -> None:
    """Serve adapters with vLLM's OpenAI-compatible server; each under its manifest name."""
    from promptbake.serve import VLLMServer, client_snippet, plan_serving, vllm_command

    items = [str(a) for a in adapters] + list(ctx.args)
    split = next((i for i, item in enumerate(items) if item.startswith("-")), len(items))  # after `--`: vLLM's own flags
    base, served = plan_serving([Path(a) for a in items[:split]])
    cmd = vllm_command(base, served, host, port, items[split:])
    if dry_run:
        out.print(" ".join(cmd), highlight=False, soft_wrap=True)
        return
    log_path = Path(os.environ.get("PROMPTBAKE_SERVE_LOG", "vllm-serve.log"))

    def _terminate(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)  # SIGTERM stops vLLM as cleanly as Ctrl-C
    with VLLMServer(cmd, host, port, log_path) as server:
        console.print(f"starting: {' '.join(cmd)}\nlog: {log_path}", highlight=False, soft_wrap=True)
        server.wait_healthy()
        out.print(f"[bold green]serving[/] {', '.join(a.name for a in served)} at {server.url}/v1 (Ctrl-C stops)")
        out.print(client_snippet(host, port, served[0].name), highlight=False)
        while server.proc.poll() is None:
            server.proc.wait(timeout=None)
        raise PromptbakeError(f"vLLM stopped with code {server.proc.returncode}; last lines:\n{server.log_tail()}")


@app.command()
@friendly
def export(
    adapter: Annotated[Path, typer.Argument(help="Baked adapter folder.")],
    to: Annotated[str, typer.Option(help="vllm: print the serving arguments; merged: write a merged full model.")] = "vllm",
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="Output folder for --to merged.")] = None,
) -> None:
    """Export an adapter: vLLM serving arguments, or a merged full model for runtimes without LoRA."""
    from promptbake.serve import export_merged, plan_serving, vllm_command

    if to == "vllm":
        base, served = plan_serving([adapter])
        import json as _json

        out.print(_json.dumps({"base_model": str(base), "lora_modules": [{"name": a.name, "path": str(a.path)} for a in served]}, indent=2))
        out.print(" ".join(vllm_command(base, served, "127.0.0.1", 8000, [])), highlight=False, soft_wrap=True)
    elif to == "merged":
        if out_dir is None:
            raise PromptbakeError("--to merged needs --out FOLDER")
        out.print(f"wrote merged model to {export_merged(adapter, out_dir)}")
    else:
        raise PromptbakeError(f"--to must be vllm or merged, got {to!r}")


@app.command()
@friendly
def chat(
    adapter: Annotated[Path, typer.Argument(help="Baked adapter folder.")],
    message: Annotated[Optional[str], typer.Option("--message", "-m", help="One message, print the answer, exit.")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Longest answer.")] = 256,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.0,
    base: Annotated[bool, typer.Option(help="Talk to the base model without the adapter, for comparison.")] = False,
    prompted: Annotated[bool, typer.Option(
        help="Talk to the prompted teacher: the base model with the prompt the adapter was baked from.")] = False,
) -> None:
    """Talk to a baked adapter, with no system prompt sent (or to the base, or the prompted teacher, to compare)."""
    _quiet_libraries()
    from promptbake.local_chat import LocalChat

    if base and prompted:
        raise PromptbakeError("--base and --prompted each pick whom to talk to; give one")
    mode = "base" if base else "prompted" if prompted else "baked"
    bot = LocalChat.load(adapter, mode=mode)
    if message is not None:
        out.print(bot.reply([{"role": "user", "content": message}], max_new_tokens, temperature), highlight=False)
        return
    history: list[dict[str, str]] = []
    who = {"base": "base, adapter off", "prompted": "prompted teacher, adapter off", "baked": "baked"}[mode]
    console.print(f"chatting with {adapter} ({who}); empty line or Ctrl-D ends")
    while True:
        try:
            line = input("you> ")
        except EOFError:
            break
        if not line.strip():
            break
        history.append({"role": "user", "content": line})
        answer = bot.reply(history, max_new_tokens, temperature)
        history.append({"role": "assistant", "content": answer})
        out.print(f"[bold]bot>[/] {answer}", highlight=False)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
