"""The demos: tiny models trained here, their synthetic videos and the fidelity evaluations.

    lockers.py      the lockers world (the default demo): 64 visual tokens a frame, questions
                    with controlled evidence ages, exact answers
    age_eval.py     `statekv eval` / `statekv demo` on it: accuracy by evidence age per method
    synthetic.py    the first world: videos of four painted slots, questions, exact answers
    evaluation.py   `statekv eval --task slots` / `statekv demo --task slots`
    lockers_checkpoint/, checkpoint/
                    the two shipped models' weights (resolved by path in `statekv.loading`,
                    no import)
"""
