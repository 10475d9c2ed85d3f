"""Writes held-out chat prompts for measuring EAGLE drafting, one per line: every 6th of
scripts/eagle/prompts.py's held-out prompts that do not depend on its random state
(comparisons, how-to, JavaScript, poems, explanations for children, advice, product copy;
their templates and topics are used nowhere in the head's training).
    python3 bench/eagle_prompts.py > prompts.txt
"""
import os
import random
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts", "eagle"))
from prompts import heldout_prompts  # noqa: E402

fixed = [text for category, text in heldout_prompts(random.Random(0)) if category != "math"]
print("\n".join(fixed[::6]))
