"""What each command does, as library functions that return records (no printing).

    plan.py       options, their preset defaults, the cost plan and the memory preflight
    ask.py        ask, compare, info: one video
    summarize.py  resumable batch summaries (shards, the Ray backend)
    bench.py      the language-model benchmark (measured and analytic)

The CLI (`statekv_cli`) parses arguments, calls one of these and renders the record.
"""
