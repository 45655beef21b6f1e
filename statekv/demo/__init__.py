"""The demo: a tiny model trained here, its synthetic videos and the fidelity evaluation.

    synthetic.py    the synthetic world: videos of painted slots, questions, exact answers
    evaluation.py   `statekv demo` and `statekv eval`: answers and accuracy per method
    checkpoint/     the shipped weights (resolved by path in `statekv.loading`, no import)
"""
