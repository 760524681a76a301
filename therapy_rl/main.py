"""Entry point: ``python -m therapy_rl.main --config configs/X.py --workdir DIR [--config.a.b=v] [--debug]``.

``--show_config`` prints every field of the config (the file with the ``--config.a.b=v`` overrides applied) with
its value and its comment from ``defaults.py``, then exits; it needs no ``--workdir`` and writes nothing.

Wires a config to its stage (``config.mode``: sft | ppo | eval); the stages live in importable modules.
Running the same command again on the same workdir resumes from the last checkpoint.
The whole config is checked (``config_validation``) before any data is read or the workdir is created; a mistake
prints one line ``error: …`` and exits with status 2 (``cli.run_cli``; ``--debug`` shows the traceback).
"""

import sys

from absl import flags, logging
from ml_collections import config_flags

from therapy_rl import cli, errors

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics.jsonl, TensorBoard events, reports.")
config_flags.DEFINE_config_file("config", None, "A configs/*.py file with get_config().", lock_config=True)
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() first (multi-host; see launch/).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for --distributed off TPU.")
flags.DEFINE_integer("num_processes", None, "Number of processes, for --distributed off TPU.")
flags.DEFINE_integer("process_id", None, "This process's index, for --distributed off TPU.")
flags.DEFINE_string("cpu_collectives", None, "CPU cross-process collectives (e.g. gloo) for multi-process CPU runs.")
flags.DEFINE_bool("show_config", False, "Print every config field with its value and comment, then exit.")
flags.mark_flags_as_required(["config"])  # --workdir is checked in main: --show_config needs none


def main(argv):
    if len(argv) > 1:
        raise errors.ConfigError(f"unexpected arguments {argv[1:]}: pass every option as --flag=value")
    if FLAGS.show_config:
        from therapy_rl import config_doc

        print(config_doc.show_config(FLAGS.config))
        return
    if not FLAGS.workdir:
        raise errors.ConfigError("--workdir is required: pass --workdir=...")
    import jax

    if not any(arg.startswith(("--verbosity", "-v")) for arg in sys.argv[1:]):
        logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO; --verbosity=0 shows it
    if FLAGS.cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", FLAGS.cpu_collectives)
    if FLAGS.distributed:
        jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                                   num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
    logging.info("JAX process %d/%d, local devices %s, global device count %d", jax.process_index(),
                 jax.process_count(), jax.local_devices(), jax.device_count())
    config = FLAGS.config
    from therapy_rl import config_validation

    config_validation.validate(config, FLAGS.workdir)
    if config.mode == "sft":
        from therapy_rl import sft
        sft.train_and_evaluate(config, FLAGS.workdir)
    elif config.mode == "ppo":
        from therapy_rl.ppo import trainer
        trainer.train_and_evaluate(config, FLAGS.workdir)
    else:
        from therapy_rl.evaluation import runner
        runner.evaluate(config, FLAGS.workdir)


if __name__ == "__main__":
    cli.run_cli(main)
