"""`python -m distill.cache_build +experiment=NAME [overrides]` (or `python -m distill cache ...`):
build the teacher-embedding cache of a config and stop, so that a cluster builds it once and many
training runs reuse it.

It composes the same config as `python -m distill` (same overrides), so it builds the entry a
training run of that config looks up. Under torchrun every rank embeds its share of the chunks
(distill.cache); alone it builds in one process. For a reinforced stream (data.train.stream.reinforced)
it writes the companion teacher shards instead (distill.reinforce), each rank its share of the shards.
Needs finetune=none (a fine-tuned teacher's cache is built by its training run). Writes no run
folder; logs to stderr; a UserError is one line `error: ...` and exit code 2.
"""

from __future__ import annotations

import logging
import sys

from omegaconf import DictConfig

log = logging.getLogger("distill")


def build(cfg: DictConfig):
    """Check the config, set up torch.distributed when under torchrun, then run the pipeline's own
    teacher, data and targets stages (the cache, or a reinforced stream's companion shards)."""
    from distill import distributed as dist_utils
    from distill import pipeline, validate
    from distill.errors import UserError

    validate.check_config(cfg)
    if cfg.finetune.get("method", "none") != "none":
        raise UserError(f"finetune={cfg.finetune.method} tunes the teacher first: its cache is built by the "
                        f"training run; the cache command builds for finetune=none")
    if not cfg.cache.enabled:
        raise UserError("cache.enabled=false: nothing to build (drop the override)")
    dist_utils.setup_from_env()
    device = pipeline.start(cfg)  # seeds as run() does before building the teacher
    p = pipeline.targets_stage(cfg, pipeline.teacher_and_data(cfg, device), device)
    if p.cache is None:  # a reinforced stream's cache is its companion shards
        out = p.data_info["reinforce"]
        if dist_utils.rank() == 0:
            print(f"companion teacher shards: {out['manifest']} (this rank built {out['built']}, kept {out['kept']}, "
                  f"failed {len(out['failed'])})")
        dist_utils.cleanup()
        return out
    if dist_utils.rank() == 0:
        print(f"teacher cache: {p.cache.path} ({p.cache.image_emb.shape[0]} items, {p.cache.text_emb.shape[0]} texts)")
    dist_utils.cleanup()
    return p.cache


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__)
        return 0
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from distill.compose import compose, one_line
    from distill.errors import find_user_error, report_user_error

    try:
        build(compose(argv, job_name="cache_build"))
    except (HydraException, OmegaConfBaseException) as e:  # an unknown experiment, option or key: exit 2 as `python -m distill`
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    except Exception as e:
        from distill.distributed import peer_lost

        user = find_user_error(e) or peer_lost(e)
        if user is None:
            raise
        return report_user_error(user)
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume (finished chunks are kept)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
