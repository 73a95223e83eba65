"""`mamba-training launch` and `mamba-training coordinator`: one node of a multi-node run, and
the store the nodes meet at. Parsing and printing only; the work is in `mamba_training.fleet`.
"""

from __future__ import annotations

from typing import Optional

import typer

from mamba_training.logging_setup import setup_logging


def register(app: typer.Typer) -> None:
    app.command("launch", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(launch)
    app.command("coordinator")(coordinator)


def launch(
    ctx: typer.Context,
    coordinator_at: str = typer.Option(..., "--coordinator", help="HOST:PORT of `mamba-training coordinator`."),
    nnodes: str = typer.Option(..., "--nnodes", help="MIN:MAX nodes (or N): start at MIN, grow up to MAX."),
    nproc_per_node: int = typer.Option(1, "--nproc-per-node", min=1, help="Trainer processes (GPUs) on this node."),
    run_id: Optional[str] = typer.Option(None, "--run-id", help="Rendezvous name (default: from the run's store)."),
    max_restarts: int = typer.Option(100, "--max-restarts", min=0, help="Re-forms allowed (each peer loss is one)."),
    connect_timeout: float = typer.Option(30.0, "--connect-timeout", min=0.1,
                                          help="Seconds to wait for the coordinator to answer at start."),
) -> None:
    """Run one node of a multi-node run; train options follow `--`.

    Exit codes: 0 run finished, 75 this node left (notice, SIGTERM) after the commit, 1 failed,
    2 bad input.
    """
    from mamba_training.fleet import launch as fleet_launch
    from mamba_training.fleet.nodes import parse_endpoint, parse_nnodes

    setup_logging("INFO")
    endpoint, node_range = parse_endpoint(coordinator_at), parse_nnodes(nnodes)
    config = fleet_launch.check_train_options(list(ctx.args))
    fleet_launch.check_batch_fits(config, node_range, nproc_per_node)
    spec = fleet_launch.LaunchSpec(
        coordinator=endpoint, nnodes=node_range, nproc_per_node=nproc_per_node,
        run_id=run_id or fleet_launch.default_run_id(config), train_args=tuple(ctx.args),
        max_restarts=max_restarts,
        shutdown_timeout_s=int(config.spot.grace_seconds) + 20,  # the flush's grace, then SIGKILL
        connect_timeout_s=connect_timeout,
    )
    raise typer.Exit(fleet_launch.run_node(spec))


def coordinator(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (0.0.0.0 on the coordinator instance)."),
    port: int = typer.Option(29400, "--port", "-p", help="Port to listen on (0: any free port)."),
) -> None:
    """Serve the rendezvous store that the nodes of every run meet at, until SIGTERM."""
    from mamba_training.fleet.coordinator import serve

    serve(host, port, ready=lambda bound: typer.echo(f"coordinator listening on {host}:{bound}", err=True))
