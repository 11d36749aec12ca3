"""`python -m distill +experiment=NAME`: compose the Hydra config and call pipeline.run;
`python -m distill list`: print every registered part (distill/catalog.py);
`python -m distill cache +experiment=NAME`: build the teacher cache only (distill/cache_build.py).

This file only composes. A UserError, an unknown experiment or option, or a malformed override
becomes one line per problem on stderr and exit code 2.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from distill.compose import config_dir
from distill.errors import find_user_error, report_user_error

INTERRUPTED = "interrupted: rerun the same command to resume (teacher cache and checkpoints are kept)"


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    from distill.pipeline import run

    try:
        run(cfg)
    except Exception as e:
        from distill.distributed import peer_lost

        user = find_user_error(e) or peer_lost(e)
        if user is None:
            raise
        sys.exit(report_user_error(user))
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        sys.exit(130)


def check_overrides(argv: list[str]) -> int | None:
    """Compose ``argv`` once before Hydra's main does: an unknown experiment, config option or key is
    one ``error:`` line and exit code 2 (Hydra's main would print its own text and exit 1)."""
    from hydra.errors import HydraException, MissingConfigException
    from omegaconf.errors import OmegaConfBaseException

    from distill.compose import compose, one_line

    # Hydra's own flags (--help, --multirun, -cd, ...) and extra config search paths change what composes:
    # those command lines are left to Hydra's main
    if any(a.startswith("-") or a.lstrip("+~").startswith("hydra.searchpath") for a in argv):
        return None
    overrides = [a for a in argv if not a.lstrip("+~").startswith("hydra.")]  # run-folder settings: Hydra's main
    try:
        compose(overrides)
    except (HydraException, MissingConfigException, OmegaConfBaseException) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    return None


def main() -> None:
    if sys.argv[1:2] == ["list"]:  # not a Hydra override: the catalogue of registered parts
        from distill.catalog import main as list_main

        sys.exit(list_main(sys.argv[2:]))
    if sys.argv[1:2] == ["cache"]:  # build the teacher cache and stop (a cluster builds it once)
        from distill.cache_build import main as cache_main

        sys.exit(cache_main(sys.argv[2:]))
    code = check_overrides(sys.argv[1:])
    if code is not None:
        sys.exit(code)
    _hydra_main()


if __name__ == "__main__":
    main()
