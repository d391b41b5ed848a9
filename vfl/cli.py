"""The ``vfl`` command. Thin: parse arguments, call into ``vfl.node`` / ``vfl.launch``, turn errors into exit codes.

Exit codes (``vfl.errors.ExitCode``): 0 ok; 1 the session failed (protocol or peer failure); 2 a problem on this
machine (usage, config, key file, data, an endpoint in use); 3 a peer was lost; 4 join or handshake timeout. Every
command is a :class:`_Command`, whose ``invoke`` is the one place where an error becomes a line and an exit code.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import NoReturn

STARTED = time.monotonic()  # this command's start (Python's own start-up is some 30 ms earlier): `vfl demo` reports it

import click  # noqa: E402 - after STARTED, which should be as early as possible

from . import __version__  # noqa: E402
from .errors import VflError, exit_code_of  # noqa: E402
from .privacy.spec import DEFENCES  # noqa: E402 - plain Python, no numpy

#: ``ctx.meta`` key: the config file a command runs, named in front of an error that does not name it already
CONFIG_META = "vfl.config"


def _command_name(ctx: click.Context) -> str:
    """``vfl node``, ``vfl keys generate``: the same however the program was started (``python -m vfl``, a script)."""
    names = []
    while ctx.parent is not None:
        names.append(ctx.info_name)
        ctx = ctx.parent
    return " ".join(["vfl", *reversed(names)])


class _Command(click.Command):
    """A ``vfl`` command. Its ``invoke`` maps errors to exit codes, once for every command.

    An error vfl raises on purpose (a ``VflError``) becomes one line, ``vfl CMD: [CONFIG: ]message``, and its
    ``exit_code`` (2 for a local problem, see ``vfl.errors``). Any other exception in a command that has ``-v``
    becomes one line and exit 1, or its traceback with ``-v``; elsewhere a bug keeps its traceback.
    """

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except VflError as exc:
            text = str(exc)
            where = ctx.meta.get(CONFIG_META)
            if where is not None and str(where) not in text:
                text = f"{where}: {text}"
            click.echo(f"{_command_name(ctx)}: {text}", err=True)
            ctx.exit(exit_code_of(exc))
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except Exception as exc:  # noqa: BLE001 - report and exit 1, never a bare traceback for an OSError or zmq error
            if "verbose" not in ctx.params or ctx.params["verbose"]:
                raise
            click.echo(f"{_command_name(ctx)}: {type(exc).__name__}: {exc} (run with -v for a traceback)", err=True)
            ctx.exit(exit_code_of(exc))


class _Group(click.Group):
    command_class = _Command
    group_class = type  # subgroups (``vfl keys``) are _Groups too


def _setup_logging(party: str, verbose: bool) -> logging.Logger:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(asctime)s vfl[{party}] %(levelname)s %(message)s", "%H:%M:%S"))
    root = logging.getLogger("vfl")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.propagate = False
    return logging.getLogger(f"vfl.node.{party}")


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="vfl")
def main() -> None:
    """vfl: vertical federated learning across independent node processes.

    Several data holders (feature columns + an ID column) and one label holder (labels + IDs) talk over ZeroMQ,
    encrypted and authenticated with CurveZMQ. Start each node with `vfl node --config FILE`, or try everything on
    one machine with `vfl demo`.
    """


insecure_option = click.option(
    "--insecure", "allow_insecure_remote", is_flag=True,
    help="Allow [keys].insecure = true on an endpoint that is not loopback (127.0.0.1, ::1, localhost): traffic is "
         "then neither encrypted nor authenticated on that network. Without this flag such a config is refused.")


fresh_option = click.option(
    "--fresh", is_flag=True,
    help="Train from epoch 1, even if the folder holds a finished or interrupted run: this party's earlier results "
         "are first moved to OUTPUT/previous-TIME/ (never deleted).")
resume_option = click.option(
    "--resume", is_flag=True,
    help="Resume the interrupted run from its checkpoint; refuse to start if there is none. Default (neither flag): "
         "resume an unfinished run, refuse a finished one. A data holder follows the label holder.")


def _start_mode(fresh: bool, resume: bool) -> str:
    if fresh and resume:
        raise click.UsageError("--fresh and --resume exclude each other: choose one (or neither: resume an unfinished "
                               "run, refuse a finished one)")
    return "fresh" if fresh else "resume" if resume else "auto"


@main.command()
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False), help="The node's TOML config.")
@click.option("-v", "--verbose", is_flag=True, help="Log protocol details (every refused message).")
@click.option("--end-session", is_flag=True,
              help="On SIGINT/SIGTERM end the session for every party. Default: in a training session, a signal "
                   "pauses this party (exit 5); the others wait up to [timeouts].rejoin for it to be started again.")
@fresh_option
@resume_option
@insecure_option
def node(config_path: str, verbose: bool, end_session: bool, fresh: bool, resume: bool,
         allow_insecure_remote: bool) -> None:
    """Run one node (label holder or data holder) as described by its config file.

    The config is checked before any network activity; a problem is reported as one line naming the key and the
    file (exit code 2). A folder whose run finished is not trained again unless --fresh says so.
    """
    start = _start_mode(fresh, resume)
    cfg = _checked_config("vfl node", config_path, allow_insecure_remote=allow_insecure_remote)
    if start != "auto" and not cfg.session.train:
        raise click.UsageError(f"--{start} is about training, and {config_path} has [session].train = false")
    _run_node(cfg, verbose, start, end_session=end_session)


def _checked_config(command: str, config_path: str, needs: str | None = None, why: str = "", *,
                    allow_insecure_remote: bool = False):
    """The node config at ``config_path`` (a ``ConfigError``, exit 2, if it is wrong). ``needs``: a [session] flag
    that must be true for this command (``why`` says what the command needs it for)."""
    from .node import ConfigError, load_config

    cfg = load_config(config_path, allow_insecure_remote=allow_insecure_remote)
    if needs is not None and not getattr(cfg.session, needs):
        raise ConfigError(f"{config_path}: {command} needs {why}")
    click.get_current_context().meta[CONFIG_META] = cfg.path
    return cfg


def _run_node(cfg, verbose: bool, start: str = "auto", *, end_session: bool = False) -> NoReturn:
    """Run a checked config. An error is reported by :class:`_Command`; a finished session exits at once.
    ``start``: auto, fresh or resume; ``end_session``: a signal ends the session for every party instead of pausing
    this one ([J2])."""
    from .node import NodeRunner
    from .node.alignment import load_ids

    log = _setup_logging(cfg.party, verbose)
    if cfg.is_segment_holder:  # v1.10: no data, no PSI of its own; two sockets (vfl.node.segment)
        from .node.segment import SegmentRunner

        code = SegmentRunner(cfg, log, end_session=end_session).run()
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    from .node.heap import return_freed_memory

    return_freed_memory()  # before the IDs are read: freed arrays go back to the OS, not into a fragmented heap
    if cfg.session.psi and cfg.psi.cluster is None:
        from .psi.engine import start_forkserver

        start_forkserver(cfg.psi.workers or None)  # while this process is small (see its docstring)
    ids = load_ids(cfg) if cfg.session.psi else None
    code = NodeRunner(cfg, log, ids=ids, start=start, end_session=end_session).run()
    # Everything this node writes is closed and fsynced by now. Exit at once: tearing down torch and libzmq takes
    # seconds on a busy machine (and a stalled libzmq context would never finish), which a launcher's Ctrl-C or a
    # peer waiting on our exit should not have to wait for.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@main.command()
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False), help="The node's TOML config.")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), help="Where to write this party's aligned IDs "
              "(CSV: row, ID). Default: [psi].output of the config.")
@click.option("-v", "--verbose", is_flag=True, help="Log protocol details.")
@insecure_option
def psi(config_path: str, out_path: str | None, verbose: bool, allow_insecure_remote: bool) -> None:
    """Private record linkage only: run the PSI with the partners and write this party's IDs in the agreed order.

    Every party runs `vfl psi` with its own config ([session].psi = true and a [data] table with the ID column).
    Each learns which of its IDs are shared by all parties, in one order common to everyone, and nothing about the
    other IDs. The label holder's file and every data holder's file list the shared IDs in the same order.

    A training config ([session].train = true) is run with training off: no model is built, trained or saved, and
    the segments and checkpoints of [train].output stay as they are. So every party must run `vfl psi`: a party
    under `vfl node` is refused with CONFIG_MISMATCH on `train`.
    """
    import dataclasses

    from .node import ConfigError

    cfg = _checked_config("vfl psi", config_path, "psi", "[session].psi = true (and the same at every party)",
                          allow_insecure_remote=allow_insecure_remote)
    if cfg.session.train:
        cfg = dataclasses.replace(cfg, session=dataclasses.replace(cfg.session, train=False, predict=False), train=None)
        click.echo(f"vfl psi: {cfg.path} has [session].train = true: running the PSI only (no training; "
                   f"[train].output is left as it is); every party must run `vfl psi` too", err=True)
    if out_path is not None:
        cfg = dataclasses.replace(cfg, psi=dataclasses.replace(cfg.psi, output=Path(out_path).resolve()))
    if cfg.psi.output is None:
        raise ConfigError(f"{config_path}: say where to write the aligned IDs: --out FILE or [psi].output")
    _run_node(cfg, verbose)


@main.command()
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False),
              help="The node's TOML config of the training run (same [session], [model] and keys).")
@click.option("--data", "data_path", type=click.Path(exists=True, dir_okay=False),
              help="This party's table for the rows to predict: the ID column and (data holders) the same features. "
                   "Every party but a segment holder, which holds no data.")
@click.option("--segment", "segment_path", type=click.Path(exists=True, dir_okay=False),
              help="This party's trained segment. Default: OUTPUT/PARTY-segment.pt of [train].output.")
@click.option("--out", "out_path", type=click.Path(dir_okay=False),
              help="Label holder: where to write predictions.csv. Default: [train].output/predictions.csv.")
@click.option("-v", "--verbose", is_flag=True, help="Log protocol details.")
@insecure_option
def predict(config_path: str, data_path: str, segment_path: str | None, out_path: str | None, verbose: bool,
            allow_insecure_remote: bool) -> None:
    """Predict with a trained split model: every party runs this with its own config and data file.

    The parties first find the IDs present at every party (private set intersection, as in training), then each
    runs its own trained segment forward; only the label holder sees the predictions, which it writes as a CSV
    (id, prediction, and class probabilities or the score). No party's weights or features leave it.
    """
    import dataclasses

    cfg = _checked_config("vfl predict", config_path, "train", "the config of a training run ([session].train = true)",
                          allow_insecure_remote=allow_insecure_remote)
    train = cfg.train
    if segment_path is not None:
        seg = Path(segment_path).resolve()
        if seg.name != f"{cfg.party}-segment.pt":
            raise click.BadParameter(f"must be this party's {cfg.party}-segment.pt", param_hint="--segment")
        train = dataclasses.replace(train, output=seg.parent)
    train = dataclasses.replace(train, predictions=Path(out_path).resolve() if out_path else None)
    if cfg.is_segment_holder and data_path is not None:
        raise click.BadParameter("a segment holder holds no data: leave --data out", param_hint="--data")
    if not cfg.is_segment_holder and data_path is None:
        raise click.UsageError("Missing option '--data': this party's table of the rows to predict")
    cfg = dataclasses.replace(
        cfg,
        session=dataclasses.replace(cfg.session, predict=True),
        data=dataclasses.replace(cfg.data, path=Path(data_path).resolve()) if data_path is not None else None,
        psi=dataclasses.replace(cfg.psi, output=None),
        train=train,
    )
    _run_node(cfg, verbose)


@main.group()
def keys() -> None:
    """CurveZMQ key pairs: every node has one; partners exchange the public halves."""


@keys.command("generate")
@click.argument("names", nargs=-1, required=True)
@click.option("--out", "out_dir", default="keys", show_default=True, type=click.Path(file_okay=False))
@click.option("--overwrite", is_flag=True, help="Replace existing key files.")
def keys_generate(names: tuple[str, ...], out_dir: str, overwrite: bool) -> None:
    """Write OUT/NAME.key (public: give it to partners) and OUT/NAME.key_secret (private, mode 0600) per NAME."""
    from .node import generate_keypair
    from .protocol.messages import is_party_id

    for name in names:
        if not is_party_id(name):
            raise click.BadParameter(f"{name!r} is not a valid party id (1-64 of A-Z a-z 0-9 _ . -)", param_hint="NAMES")
    for name in names:
        public, secret = generate_keypair(out_dir, name, overwrite=overwrite)
        click.echo(f"{name}: public {public}  secret {secret}")


def _window(value: str) -> int | str:
    """``--window``: an integer 1..64 or "auto"."""
    if value == "auto":
        return value
    if not value.isdigit() or not 1 <= int(value) <= 64:
        raise click.BadParameter(f'{value!r} is neither an integer in 1..64 nor "auto"')
    return int(value)


@main.command()
@click.argument("dataset", type=click.Choice(["breast", "digits", "chain"]), default="breast")
@click.option("--data-holders", "n_data_holders", default=1, show_default=True, type=click.IntRange(1, 8),
              help="digits: how many data holders share the image columns (breast and chain always have 1).")
@click.option("--epochs", type=click.IntRange(1, None), help="Train this many epochs instead of the demo's own.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), help="Run folder. Default: runs/demo-DATASET.")
@click.option("--window", default="2", show_default=True, callback=lambda ctx, param, value: _window(value),
              help='Pipeline window W: 1..64, or "auto" (the label holder picks it from its first steps).')
@click.option("--prepare-only", is_flag=True, help="Write data, keys and configs; print the per-node commands.")
@click.option("--defence", type=click.Choice(DEFENCES),
              default="none", show_default=True, help="The training's label-leakage defence ([privacy].defence).")
@click.option("--defence-param", "defence_params", multiple=True, metavar="KEY=VALUE",
              help="A parameter of the defence, e.g. sumkl=4 (repeatable; see PRIVACY.md).")
def demo(dataset: str, n_data_holders: int, epochs: int | None, out_dir: str | None, window: int | str,
         prepare_only: bool, defence: str, defence_params: tuple[str, ...]) -> None:
    """Zero set-up: partition a data set that scikit-learn ships across parties, then PSI + split training.

    breast: breast cancer, split as FATE's hetero demo (the label holder has the label and 10 features, one data
    holder the other 20). digits: 8x8 digit images, column slices across N data holders. chain: the digits through
    three tiers, a data holder (all 64 pixels, 64 -> 128), a segment holder with no data (128 -> 640) and the label
    holder (640 -> 10). Each party's IDs are
    shuffled and some rows are missing, so the private set intersection matters. Every node runs as its own
    process over CurveZMQ; results land in the run folder (model/metrics.jsonl, summary.json, per-node logs).
    """
    import json as _json
    import shutil

    from .launch import launch
    from .launch.demo import leak_line, parties_line, prepare_demo, privacy_table, summarize

    privacy = privacy_table(defence, defence_params)
    out = Path(out_dir or f"runs/demo-{dataset}")
    if out.exists() and not prepare_only:
        shutil.rmtree(out / "model", ignore_errors=True)  # a fresh run, not a resume of the last one
    d = prepare_demo(dataset, out, data_holders=n_data_holders, window=window, privacy=privacy, epochs=epochs)
    if prepare_only:
        click.echo(f"wrote data, keys and configs to {out}; start each node in its own terminal:")
        for path in d.configs.values():
            click.echo(f"  vfl node --config {path}")
        return
    result = launch(list(d.configs.items()), started=STARTED)  # it writes logs/ and summary.json, atomically
    logs_dir = out / "logs"
    summary = summarize(d, result.wall_s, result.logs, result.exit_codes, started=STARTED)
    final = ", ".join(f"{k} {v:.4f}" for k, v in summary["final"].items() if k.startswith("val_"))
    if summary.get("kept_epoch") not in (None, summary["epochs"]):
        final += f" (the weights after epoch {summary['kept_epoch']} of {summary['epochs']}: the lowest validation loss)"
    click.echo(f"demo {dataset}: {'ok' if summary['ok'] else 'FAILED'} in {summary['wall_seconds']} s "
               f"(nodes {summary['launch_seconds']} s); {summary['aligned_rows']} aligned rows; {final}")
    for line in (parties_line(summary), leak_line(summary)):
        if line:
            click.echo(line)
    click.echo(f"summary: {out / 'summary.json'}")
    if result.failed:
        click.echo(f"vfl demo: failed: {', '.join(f'{n} (exit {result.exit_codes[n]})' for n in result.failed)}; "
                   f"logs in {logs_dir}", err=True)
        sys.exit(1)
    del _json


@main.command(name="launch")
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
@fresh_option
@resume_option
def launch_cmd(folder: str, fresh: bool, resume: bool) -> None:
    """Start every node config (*.toml) in FOLDER as its own process: label holder, segment holders, data holders.

    Logs are prefixed with each node's name; Ctrl-C stops every node; the exit code is non-zero if any node failed.
    --fresh / --resume are passed to every node.
    """
    start = _start_mode(fresh, resume)
    from .launch import launch
    from .launch.local import start_order
    from .node import ConfigError, load_config

    entries = []
    for path in sorted(Path(folder).glob("*.toml")):
        cfg = load_config(path)
        entries.append((start_order(cfg), cfg.party, path))
    if not entries:
        raise ConfigError(f"no *.toml node configs in {folder}")
    node_args = [] if start == "auto" else [f"--{start}"]
    result = launch([(party, path) for _, party, path in sorted(entries)], started=STARTED, node_args=node_args)
    click.echo(f"summary: {Path(folder) / 'summary.json'}", err=True)
    if result.failed:
        click.echo(f"vfl launch: failed: {', '.join(f'{n} (exit {result.exit_codes[n]})' for n in result.failed)}", err=True)
        sys.exit(1)
    click.echo(f"vfl launch: every node finished in {result.wall_s:.1f} s", err=True)


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=True, dir_okay=True))
@click.option("--out", "out_path", type=click.Path(dir_okay=False),
              help="Where to write the PNG. Default: RUN_DIR/learning-curves.png.")
def plot(run_dir: str, out_path: str | None) -> None:
    """Learning curves of a run as a PNG: loss, and accuracy/AUC or RMSE, training vs validation, per epoch.

    Reads RUN_DIR/model/metrics.jsonl (the label holder's one line per epoch). Needs matplotlib:
    pip install 'vfl[plot]'.
    """
    from .launch.plot import PlotError, plot_run

    try:
        path = plot_run(run_dir, out_path)
    except OSError as exc:
        raise PlotError(f"cannot write {out_path or 'the PNG'}: {exc.strerror or exc}") from None
    click.echo(f"wrote {path}")


@main.command(name="init")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--label-holder", required=True, metavar="NAME=CSV", help="The label holder's name and table.")
@click.option("--data-holder", "data_holders", multiple=True, required=True, metavar="NAME=CSV",
              help="A data holder's name and table (repeat for more data holders).")
@click.option("--label-column", required=True, help="The label holder's label column.")
@click.option("--id-column", default="id", show_default=True, help="The ID column of every table...")
@click.option("--id-column-of", "id_columns", multiple=True, metavar="NAME=COLUMN",
              help="...except this party's (repeatable).")
@click.option("--task", type=click.Choice(["binary", "multiclass", "regression"]),
              help="Default: from the labels (2 values: binary; fractions or > 20 numbers: regression; else "
                   "multiclass).")
@click.option("--epochs", default=20, show_default=True, type=click.IntRange(1))
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1))
@click.option("--window", default=1, show_default=True, type=click.IntRange(1, 64),
              help="Pipeline window W (1: synchronous and reproducible; more: faster, varies run to run).")
@click.option("--lr", default=0.01, show_default=True, type=click.FloatRange(0, min_open=True), help="Adam's lr.")
@click.option("--overwrite", is_flag=True, help="Replace the node configs already in OUT_DIR (keys are kept).")
@click.option("--segment-holder", "segment_holders", multiple=True, metavar="NAME=INPUT,...",
              help="A segment holder (no data, a model segment) fed by these data/segment holders (repeatable).")
def init_cmd(out_dir: str, **options) -> None:
    """Write a commented node config per party and their keys into OUT_DIR, from the parties' own tables.

    Every table is read as its node will read it (columns, IDs, labels checked now); then `vfl launch OUT_DIR`
    runs the PSI and the training on this machine. Example:
    vfl init run1 --label-holder bank=bank.csv --label-column y --data-holder shop=shop.csv --id-column-of shop=cust
    """
    from .launch.init import InitError, init_run

    try:
        result = init_run(out_dir, **options)
    except InitError as exc:
        click.echo(f"vfl init: {exc}", err=True)
        sys.exit(2)
    click.echo(result.report())


@main.command(name="link-proxy")
@click.option("--listen", required=True, metavar="HOST:PORT", help="Where the data holders connect (their endpoint).")
@click.option("--target", required=True, metavar="HOST:PORT", help="Where the label holder listens.")
@click.option("--rtt-ms", default=0.0, show_default=True, type=click.FloatRange(0),
              help="Round-trip time to add (half each way).")
@click.option("--mbit", default=0.0, show_default=True, type=click.FloatRange(0),
              help="Bandwidth per direction in Mbit/s (0: unlimited).")
def link_proxy(listen: str, target: str, rtt_ms: float, mbit: float) -> None:
    """Relay TCP from LISTEN to TARGET through an emulated WAN link: added delay and a bandwidth cap per direction.

    To see how a run behaves across organisations on one machine: the label holder binds TARGET, the data holders'
    endpoint is LISTEN. Example (50 ms, 100 Mbit/s):
    vfl link-proxy --listen 127.0.0.1:6001 --target 127.0.0.1:6000 --rtt-ms 50 --mbit 100
    """
    from .launch.link import serve

    serve(listen, target, rtt_ms, mbit, echo=click.echo)
