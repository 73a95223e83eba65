"""`mamba-training rehearse`: the production fleet flow on one machine, with spot interruptions.

moto.py (the AWS), stack.py (the Terraform stack applied to it), procs.py (the processes it
starts), instance.py and fleet.py (the simulated fleet), schedule.py and prices.py (the seeded
disruptions and market, pure), run.py (the loop), view.py and report.py (what the user sees).
"""
