"""Entry point for a Ray cluster: the same code path as `dreamfocus run`.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/run_library.py s3://bucket/photos s3://bucket/edited --address auto \
        --gpus-per-actor 1 --model-actors 8

Every option of `dreamfocus run` is accepted (see `dreamfocus run --help`). One model actor per
GPU holds both models; by default the pool is sized from the GPUs the cluster has when the job
starts. Where GPU workers start on demand there are none yet, so give the layout explicitly:
--gpus-per-actor 1 and --model-actors <the most GPU workers the cluster may start>.

The working directory (`--working-dir .`) is put on the job's PYTHONPATH, so this runs the
submitted code of `pipeline/` even where the project is not installed on the nodes.
"""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
