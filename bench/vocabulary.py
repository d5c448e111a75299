"""The benchmark's token ids as short text, for pictures labelled with a prompt's tokens:
the shared vocabulary (bench/tasks.py), the multi-hop tasks' words (bench/multihop.py),
the filler between statements (bench/spread.py) and the multitask scale's task tokens."""
from .multihop import LET, START
from .scales import MULTITASK_TASKS, TASK_TOKEN0
from .spread import FILLER0, FILLER_COUNT
from .tasks import NUM0, NUM_COUNT, SYM0, SYM_COUNT

WORDS = ("<pad>", "<bos>", "=", "+", ">", "(", ")", "yes", "no", "he", "she", "sg", "pl",
         "def", "doc", "rel", "succ", "count", "sort", "to", "verb", "?", "let", "START")
assert WORDS.index("let") == LET and WORDS.index("START") == START


def token_text(i):
    """Token ``i`` as text: a word, a number (``7``), a symbol (``s12``: a variable, a node
    or a name), ``·`` for filler, ``[task]`` for a multitask task token."""
    i = int(i)
    if 0 <= i < len(WORDS):
        return WORDS[i]
    if NUM0 <= i < NUM0 + NUM_COUNT:
        return str(i - NUM0)
    if SYM0 <= i < SYM0 + SYM_COUNT:
        return f"s{i - SYM0}"
    if FILLER0 <= i < FILLER0 + FILLER_COUNT:
        return "·"
    if TASK_TOKEN0 <= i < TASK_TOKEN0 + len(MULTITASK_TASKS):
        return f"[{MULTITASK_TASKS[i - TASK_TOKEN0]}]"
    raise ValueError(f"token id {i} is outside the benchmark's vocabulary")
