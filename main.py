"""Runs one experiment: `python main.py --config=configs/demo.py [--workdir=runs/demo] [--config.key=value]`."""

import os
import sys
from pathlib import Path

from cass_jax.host_allocator import allocator_hint, rerun_with_hugepages

# Before anything else: glibc reads its malloc tunables only at start-up (cass_jax/host_allocator.py says why).
rerun_with_hugepages()

# TensorFlow (behind TensorBoard writing and TFDS) prints oneDNN notices on import on some CPUs; it computes nothing here.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from cass_jax import onednn
from cass_jax.run import run

config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py[:variant]).", lock_config=True)
flags.DEFINE_string("workdir", None, "Output folder: TensorBoard events, checkpoints/, export/, results. "
                    "Default: runs/<config file name>. Rerunning with the same workdir resumes.")
flags.DEFINE_bool("distributed", False, "Join a multi-host run with jax.distributed.initialize() "
                  "(arguments from the flags below or the cluster's environment).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for --distributed.")
flags.DEFINE_integer("num_processes", None, "Number of processes, for --distributed.")
flags.DEFINE_integer("process_id", None, "This process's index, for --distributed.")
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, with a misspelt `--config.key` reported in one line instead of a traceback."""
    try:
        return FLAGS(argv)
    except (AttributeError, KeyError) as error:
        while error.args and isinstance(error.args[0], BaseException):
            error = error.args[0]
        detail = " ".join(str(error.args[0] if error.args else error).split())
        overrides = " ".join(arg for arg in argv[1:] if arg.startswith("--config."))
        print(f"error: unknown config key {detail} (in {overrides}); the keys are listed in configs/common.py "
              "and the config file.", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    if FLAGS.distributed:
        jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    workdir = FLAGS.workdir or str(Path("runs") / Path(config_flags.get_config_filename(FLAGS["config"])).stem)
    logging.info("Workdir: %s; devices: %s", workdir, jax.devices())
    hint = allocator_hint(jax.default_backend())
    if hint:
        logging.info(hint)
    logging.info(onednn.status())
    try:
        run(FLAGS.config, workdir)
    except (FileNotFoundError, ValueError) as error:
        if FLAGS.verbosity > 0:
            raise
        print(f"error: {error} (rerun with --verbosity=1 for the traceback)", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
