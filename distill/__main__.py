"""`python -m distill +experiment=NAME`: compose the Hydra config and call pipeline.run;
`python -m distill list`: print every registered part (distill/catalog.py);
`python -m distill cache +experiment=NAME`: build the teacher cache only (distill/cache_build.py).

This file only composes. A UserError becomes one line per problem on stderr and exit
code 2; Hydra's own errors (unknown experiment or key) are printed by Hydra and exit 1.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig


def config_dir() -> str:
    """The packaged configs (distill/conf, shipped in the wheel) or the repository's conf/."""
    here = Path(__file__).resolve().parent
    for cand in (here / "conf", here.parent / "conf"):
        if (cand / "config.yaml").exists():
            return str(cand)
    raise SystemExit("error: clip-distill configs not found (distill/conf or ./conf); reinstall the package")


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    from distill.errors import UserError
    from distill.pipeline import run

    try:
        run(cfg)
    except Exception as e:
        user = _user_error(e, UserError)
        if user is None:
            raise
        sys.exit(_report_user_error(user))
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume (teacher cache and checkpoints are kept)",
              file=sys.stderr)
        sys.exit(130)


def _user_error(e: BaseException | None, kind: type) -> BaseException | None:
    """The UserError behind ``e``: Hydra's instantiate wraps errors raised by a ``_target_``
    (InstantiationException), and the user must see our one line, not Hydra's wrapper."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, kind):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def _report_user_error(user: BaseException) -> int:
    """Print a UserError as ``error: ...`` lines (a ConfigError has one line per problem) and return
    its exit code; a torchrun rank first leaves its process group, so it exits with that code
    rather than a gloo abort at teardown."""
    from distill import distributed as dist_utils

    dist_utils.abandon()
    for line in str(user).splitlines() or [type(user).__name__]:
        print(f"error: {line}", file=sys.stderr)
    return user.exit_code


def main() -> None:
    if sys.argv[1:2] == ["list"]:  # not a Hydra override: the catalogue of registered parts
        from distill.catalog import main as list_main

        sys.exit(list_main(sys.argv[2:]))
    if sys.argv[1:2] == ["cache"]:  # build the teacher cache and stop (a cluster builds it once)
        from distill.cache_build import main as cache_main

        sys.exit(cache_main(sys.argv[2:]))
    _hydra_main()


if __name__ == "__main__":
    main()
