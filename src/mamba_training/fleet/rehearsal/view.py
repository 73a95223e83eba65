"""What the terminal shows: the live view of a rehearsal (one rich renderable per snapshot) and the
end summary. Only builds renderables; the CLI decides where and whether they are printed."""

from __future__ import annotations

from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

from mamba_training.fleet.rehearsal.run import Snapshot


def live(snapshot: Snapshot) -> Group:
    head = Text(f"rehearsal  {snapshot.elapsed:6.1f} s  {snapshot.phase}", style="bold")
    instances = Table("instance", "state", "busy", "up", "reclaim in", title="instances", title_justify="left")
    for i in snapshot.instances:
        instances.add_row(i["id"], i["state"], "yes" if i["busy"] else "-", f"{i['up_s']:.0f} s",
                          "-" if i["deadline_s"] is None else f"{max(0.0, i['deadline_s']):.0f} s")
    jobs = Table("job", "state", "step", "attempts", "preempted", title="jobs", title_justify="left")
    for j in snapshot.jobs:
        jobs.add_row(j["name"], j["state"], f"{j['step']}/{j['max_steps']}", str(j["attempts"]), str(j["preemptions"]))
    counts = snapshot.disruptions
    money = Text(
        f"notices {counts.get('notice', 0)}  rebalance {counts.get('rebalance', 0)}  "
        f"hard kills {counts.get('hard-kill', 0)}    spot ${snapshot.cost_spot_usd:.4f}"
        + (f" (now ${snapshot.spot_price:.3f}/h)" if snapshot.spot_price is not None else "")
        + f"  vs on-demand ${snapshot.cost_on_demand_usd:.4f}")
    return Group(head, instances, jobs, money)


def summary(result: dict[str, Any]) -> Group:
    jobs = Table("job", "state", "final step", "attempts", "preempted", "lost steps", "same as straight",
                 title="jobs", title_justify="left")
    for j in result["jobs"]:
        same = {True: "yes (bitwise)", False: "NO", None: "-"}[j["identical_to_straight"]]
        jobs.add_row(j["name"], j["state"], f"{j['final_step']}/{j['max_steps']}", str(j["attempts"]),
                     str(j["preemptions"]), str(j["lost_steps"]), same)
    saving = result.get("saving_percent")
    lines = Text("\n".join([
        f"jobs: {result['jobs_completed']} done, {result['jobs_failed']} failed, "
        f"{result['jobs_unfinished']} unfinished",
        f"interruptions: {result['notices']} notices ({result['rebalance_recommendations']} after a rebalance "
        f"recommendation), {result['hard_kills']} hard kills; lost steps {result['lost_steps']} "
        f"({result['lost_steps_after_notice']} after notices); goodput {100 * result['goodput']:.1f} %",
        f"fleet: desired capacity {' -> '.join(map(str, result['capacity_history']))}; "
        f"{result['instances_launched']} instances, {result['instance_seconds']:.0f} instance-seconds",
        f"cost: spot ${result['cost_spot_usd']:.4f} vs on-demand ${result['cost_on_demand_usd']:.4f}"
        + (f" ({saving:.0f} % less)" if saving is not None else "")
        + f" for {result['instance_type']} at a simulated market (seed {result['seed']})",
        f"files: {result['directory']}  (plot {result.get('png', '-')})",
    ]))
    return Group(jobs, lines)


__all__ = ["live", "summary"]
