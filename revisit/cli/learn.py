"""``revisit learn``: train the encoder, in one process or in several (DDP)."""

from __future__ import annotations

import math
import sys
import threading
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from revisit.cli._common import State, get_settings, stdout
from revisit.config import LEARNER_METHODS, Settings

DEFAULT_LEARN_STEPS = 1000


def _positive_minutes(value: float | None) -> float | None:
    """``--minutes``: a finite number of minutes above zero, or unset."""
    if value is not None and not (0 < value < math.inf):
        raise typer.BadParameter(f"{value:g} is not a number of minutes above 0")
    return value


def learn(
    ctx: typer.Context,
    steps: Annotated[
        int | None,
        typer.Option(
            min=0,
            help=f"How many steps to take (default {DEFAULT_LEARN_STEPS}; with --minutes, "
            "no limit but the time).",
        ),
    ] = None,
    minutes: Annotated[
        float | None,
        typer.Option(
            callback=_positive_minutes,
            help="Train for this many minutes of wall-clock time (0.5, 15, 90); with --steps, "
            "whichever comes first.",
        ),
    ] = None,
    method: Annotated[
        str | None,
        typer.Option(help="moco, tp, geo-tp, seco, teco or caco (default: learner.method)."),
    ] = None,
    new_model: Annotated[
        bool,
        typer.Option(
            "--new-model",
            help="Start a fresh model even if the database holds a checkpoint; "
            "the step counter and the change estimates carry on.",
        ),
    ] = False,
    init_from: Annotated[
        Path | None,
        typer.Option(
            help="With --new-model: start from this checkpoint's weights (a .pt file of"
            " another data directory's checkpoints/), to adapt a model to these places.",
        ),
    ] = None,
    nproc: Annotated[
        int,
        typer.Option(
            min=1,
            max=256,
            help="Train one model with this many processes on this machine (torch.distributed"
            " DDP: gloo on CPU, NCCL with one GPU each); each takes learner.batch_size"
            " locations a step. Across machines, run `torchrun ... -m revisit learn` instead.",
        ),
    ] = 1,
    forever: Annotated[
        bool,
        typer.Option(
            "--forever",
            help="Train until stopped (Ctrl-C, SIGTERM), checkpointing every"
            " learner.checkpoint_every steps: how `revisit run` runs a learner of"
            " daemon.learner_processes > 1.",
        ),
    ] = False,
    exit_with_parent: Annotated[
        bool,
        typer.Option(
            "--exit-with-parent",
            help="Stop (checkpointing) when the process that started it exits (for supervisors).",
        ),
    ] = False,
) -> None:
    """Train the encoder on the ingested observations and update every location's r.

    Resumes from the newest checkpoint; Ctrl-C (or SIGTERM) ends the step in
    progress, checkpoints and exits, and so does the end of --minutes. With
    --nproc N (or as a rank of torchrun) N processes train one model; rank 0
    writes to the database and prints the summary.
    """
    # Checked before the imports of torch and the learner, which take seconds.
    if method is not None and method not in LEARNER_METHODS:
        raise typer.BadParameter(
            f"must be one of {', '.join(LEARNER_METHODS)}", param_hint="--method"
        )

    import signal
    import threading

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from revisit.db import learning
    from revisit.db.engine import Database
    from revisit.db.migrate import upgrade
    from revisit.learner.launch import launched

    settings = get_settings(ctx)
    if init_from is not None and not new_model:
        raise typer.BadParameter("needs --new-model", param_hint="--init-from")
    if forever and (steps is not None or minutes is not None):
        raise typer.BadParameter("--forever goes without --steps and --minutes")
    if forever:
        steps = sys.maxsize
    if nproc > 1 and not launched():
        args = [*(["--steps", str(steps)] if steps is not None else [])]
        args += ["--minutes", f"{minutes!r}"] if minutes is not None else []
        args += ["--method", method] if method is not None else []
        args += ["--new-model"] if new_model else []
        args += ["--init-from", str(init_from.resolve())] if init_from is not None else []
        state: State = ctx.find_root().obj
        raise typer.Exit(
            _launch_learners(
                settings, nproc, args, config=state.config_file, exit_with_parent=exit_with_parent
            )
        )
    if steps is None and minutes is None:
        steps = DEFAULT_LEARN_STEPS
    stop = threading.Event()

    def request_stop(signum: int, frame: object) -> None:
        stop.set()

    dist = None
    if launched():
        from revisit.learner.distributed import Distributed

        dist = Distributed.from_environment(settings.learner.device)
    main_rank = dist is None or dist.is_main
    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    if exit_with_parent:
        _stop_with_parent(stop)
    try:
        with Database(settings) as db:
            if main_rank:
                upgrade(db.engine)
            if dist is None:
                # A checkpoint of another method is refused before the seconds that the
                # learner's imports take (the learner checks again: it has other callers).
                with db.engine.connect() as conn:
                    latest = learning.latest_model_version(conn)
                learning.check_resumable(
                    latest, method or settings.learner.method, new_model=new_model
                )
            else:
                dist.barrier()  # the others wait for rank 0's migrations
            from revisit.learner.online import OnlineLearner, StepReport  # torch: seconds

            with (
                OnlineLearner(
                    settings=settings,
                    engine=db.engine,
                    method=method,
                    new_model=new_model,
                    init_from=init_from,
                    dist=dist,
                ) as learner,
                Progress(
                    TextColumn("{task.description}"),
                    BarColumn(),
                    MofNCompleteColumn(),
                    TimeElapsedColumn(),
                    TextColumn("{task.fields[stats]}"),
                    console=Console(stderr=True),
                    transient=True,
                    disable=not main_rank,
                ) as bar,
            ):
                budget = f", {minutes:g} min" if minutes is not None else ""
                task = bar.add_task(
                    f"{learner.method} from step {learner.step}{budget}",
                    total=steps,  # None: a pulsing bar, "n/?" steps
                    stats="",
                )

                def progress(report: StepReport) -> None:
                    bar.update(
                        task,
                        advance=1,
                        stats=f"step {report.step}  loss {report.loss:.3f}  "
                        f"{report.steps_per_s:.2f} steps/s  "
                        f"changed {report.changed_fraction:.1%} of {report.measured}",
                    )

                summary = learner.run(
                    sys.maxsize if steps is None else steps,
                    stop=stop,
                    max_seconds=None if minutes is None else minutes * 60.0,
                    on_step=progress,
                )
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if dist is not None:
            dist.close()
    if not main_rank:
        return
    # Seven columns: the table fits 80 characters, the width when not on a terminal.
    table = Table(
        "method",
        "steps",
        "last step",
        "mean loss",
        "steps/s",
        "images/s",
        "changed",
        show_edge=False,
    )
    rate = summary.steps / summary.seconds if summary.seconds > 0 else 0.0
    # The global batch; fewer per step only with fewer locations than this.
    batch = settings.learner.batch_size * (dist.world_size if dist is not None else 1)
    table.add_row(
        summary.method,
        str(summary.steps),
        str(summary.last_step),
        f"{summary.mean_loss:.4f}",
        f"{rate:.2f}",
        f"{rate * batch:.1f}",
        f"{summary.changed_fraction:.1%} of {summary.measured}",
    )
    stdout.print(table)
    processes = f" on {dist.world_size} processes" if dist is not None else ""
    stdout.print(
        f"{summary.steps} steps of {batch} locations{processes} in {summary.seconds:.1f} s"
    )
    if stop.is_set():
        stdout.print(
            f"[yellow]stopped at step {summary.last_step}; checkpointed, the next run resumes[/]"
        )
    elif summary.stopped and minutes is not None:
        stdout.print(
            f"time budget of {minutes:g} min reached at step {summary.last_step}; checkpointed"
        )


def _stop_with_parent(stop: threading.Event, *, poll_s: float = 1.0) -> None:
    """Set ``stop`` once the process that started this one has exited (a thread watches)."""
    import os

    parent = os.getppid()

    def watch() -> None:
        while not stop.wait(poll_s):
            if os.getppid() != parent:
                stop.set()

    threading.Thread(target=watch, name="revisit-parent-watch", daemon=True).start()


def _launch_learners(
    settings: Settings,
    nproc: int,
    args: list[str],
    *,
    config: Path | None,
    exit_with_parent: bool = False,
) -> int:
    """``revisit learn --nproc N``: N ranks of ``revisit learn`` under ``torch.distributed.run``.

    The database is opened (the embedded cluster started) and migrated here
    first, so the ranks find it up; SIGINT and SIGTERM go on to the launcher,
    whose ranks checkpoint and stop together (and so does the exit of this
    process's parent, with ``exit_with_parent``).

    Returns:
        The launcher's exit status.
    """
    import signal
    import subprocess

    from revisit.db.engine import Database
    from revisit.db.migrate import upgrade

    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nnodes=1",
        f"--nproc-per-node={nproc}",
        "-m",
        "revisit",
        *(["--config", str(config.resolve())] if config is not None else []),
        "learn",
        *args,
    ]
    with Database(settings) as db:
        upgrade(db.engine)
        child = subprocess.Popen(command)

        def forward(signum: int, frame: object) -> None:
            child.send_signal(signum)

        previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
        orphaned = threading.Event()
        if exit_with_parent:
            _stop_with_parent(orphaned)
        try:
            while True:
                try:
                    return child.wait(timeout=0.5)
                except subprocess.TimeoutExpired:
                    if orphaned.is_set():
                        orphaned.clear()
                        child.send_signal(signal.SIGTERM)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
