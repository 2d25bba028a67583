"""Entry point for a Ray cluster: the same code path as `dreamfocus run`.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/run_library.py s3://bucket/photos s3://bucket/edited --address auto

Every option of `dreamfocus run` is accepted (see `dreamfocus run --help`).
"""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
