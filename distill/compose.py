"""Where the configs live and how a config is composed without Hydra's run folder.

A leaf: the CLI (distill/__main__.py), the cache command, the catalogue, the engine's defaults,
tests and benchmarks all compose through here, so nothing below the entry point imports it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig


def config_dir() -> str:
    """The packaged configs (distill/conf, shipped in the wheel) or the repository's conf/."""
    here = Path(__file__).resolve().parent
    for cand in (here / "conf", here.parent / "conf"):
        if (cand / "config.yaml").exists():
            return str(cand)
    raise SystemExit("error: clip-distill configs not found (distill/conf or ./conf); reinstall the package")


def compose(overrides: Sequence[str] = (), config_name: str = "config", job_name: str = "compose") -> DictConfig:
    """The config ``python -m distill OVERRIDES`` composes, without Hydra's run folder or logging."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3", job_name=job_name):
        return hydra_compose(config_name=config_name, overrides=list(overrides))


def one_line(e: BaseException) -> str:
    """Hydra's multi-line composition error as one line: the problem and the options, without the
    config search path it appends."""
    text = " ".join(str(e).split("Config search path")[0].split())
    if type(e).__name__ == "OverrideParseException":  # e.g. shard braces, which Hydra reads as a dict
        text += """ (a value with braces, commas or spaces goes in double quotes: 'key="a-{000..009}.tar"')"""
    return text


def train_defaults(**overrides: Any) -> dict[str, Any]:
    """conf/train/default.yaml as a plain dict with ``overrides`` merged in (nested dicts merge): the
    engine's complete settings for code and tests that call it without Hydra."""
    from omegaconf import OmegaConf

    base = OmegaConf.load(Path(config_dir()) / "train" / "default.yaml")
    base = {k: v for k, v in OmegaConf.to_container(base).items() if k != "defaults"}
    merged = OmegaConf.merge(base, OmegaConf.create(overrides))
    return OmegaConf.to_container(merged, resolve=True)
