"""Exit codes of every `bigbatch` command and of each rank, in one place.

    0    OK           the run finished, or stopped gracefully on TERM/USR1 (checkpoint saved)
    1    FAILED       anything else went wrong (a crash, a rank failed)
    2    BAD_INPUT    bad config, file or flag: one line naming it, nothing started
    3    DIVERGED     training stopped on non-finite loss or gradient norm
    130  INTERRUPTED  Ctrl-C (SIGINT): checkpoint saved at the next step boundary (128 + SIGINT)
"""

OK = 0
FAILED = 1
BAD_INPUT = 2
DIVERGED = 3
INTERRUPTED = 130
