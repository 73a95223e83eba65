"""A sample rehearsal result for the report and view tests."""

from __future__ import annotations

from mamba_training.fleet.rehearsal.report import JobReport, summary


def a_result() -> dict:
    jobs = [JobReport("job-1", "tiny-0", "done", 1, 1, 1, 60, 60, "s3://b/jobs/job-1/run", trained_steps=60,
                      identical_to_straight=True, progress=[(0.0, 0), (5.0, 30), (9.0, 60)]),
            JobReport("job-2", "tiny-1", "failed", 1, 3, 0, 20, 60, "s3://b/jobs/job-2/run", trained_steps=27,
                      lost_steps=7, progress=[(0.0, 0), (4.0, 20)])]
    disruptions = [{"at": 3.0, "kind": "rebalance", "instance": "i-1", "event": 0},
                   {"at": 3.0, "kind": "notice", "instance": "i-1", "event": 0},
                   {"at": 4.5, "kind": "hard-kill", "instance": "i-2", "event": 1}]
    return summary(jobs, disruptions, [0, 2, 0], [(0.0, 0, 0), (1.0, 2, 2), (10.0, 0, 0)], (0.01, 0.03),
                   {"seed": 7, "cost_series": [[0, 0, 0], [10, 0.01, 0.03]]})
