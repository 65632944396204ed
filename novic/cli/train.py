"""`novic-train`: train a NOVIC object decoder from text alone.

    novic-train config > my.json                     # the default config, to edit
    novic-train nouns nouns.json --min-zipf 3.5      # object nouns from WordNet (offline)
    novic-train cache my.json                        # captions + embedding cache only
    novic-train train my.json -o optim.lr=1e-3 -o out_dir=runs/a [--resume]
    torchrun --nproc_per_node 4 -m novic.cli.train train my.json    # multi-GPU (DDP)

Config files are .json or .toml (sections as in novic/train/config.py); `-o section.key=value`
overrides any key (values are parsed as JSON where possible). Every value is type- and range-checked
before any work. Imports are lazy so that --help is fast.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from novic.cli._common import one_line_errors, run_app
from novic.errors import cli_voice

app = typer.Typer(help="Train a NOVIC object decoder from text (captions of nouns) alone.",
                  add_completion=False, no_args_is_help=True)

OVERRIDE = typer.Option(None, "--set", "-o", help="Override a config key: section.key=value.")


# Bad input or config: one line on stderr and exit code 1, no traceback. Besides novic's own
# errors and OSErrors about a path: ValueError (torch's and the config's checks), ImportError (an
# optional package), and the FileNotFoundErrors novic raises in its own words (the file and the fix).
USER_ERRORS = (ValueError, ImportError, FileNotFoundError)


def clear_errors():
    """Inside each command, so that the commands give one line under typer's CliRunner too."""
    return one_line_errors(*USER_ERRORS, extra="train")


def _config(path: Optional[Path], overrides: Optional[List[str]]):
    from novic.train.config import load_config
    return load_config(path, overrides or [])


@app.command()
def config(out: Optional[Path] = typer.Argument(None, help="Write here instead of stdout (.json).")):
    """Print (or write) the default training config (JSON)."""
    with clear_errors():
        from novic.atomic import write_bytes_atomic
        from novic.train.config import ConfigError, TrainConfig
        # JSON only: TOML has no null for the unset keys, and no TOML writer is a dependency.
        if out and out.suffix.lower() != ".json":
            raise ConfigError(f"{out}: the config is written as JSON; name the file .json")
        text = json.dumps(TrainConfig().to_dict(), indent=2) + "\n"
        if out:
            write_bytes_atomic(out, text.encode())
        else:
            typer.echo(text, nl=False)


@app.command()
@cli_voice   # its errors name --wordnet-dir (in `cache` and `train` it is the config's wordnet_dir)
def nouns(out: Path = typer.Argument(..., help="Noun list to write (.json, .csv or .txt)."),
          min_zipf: float = typer.Option(3.0, help="wordfreq Zipf frequency threshold."),
          max_nouns: Optional[int] = typer.Option(None, min=1, help="Keep at most this many (most frequent)."),
          wordnet_dir: Path = typer.Option(Path("/usr/share/wordnet"), help="WordNet 3.0 database.")):
    """Build an object-noun list from WordNet, ranked by word frequency."""
    with clear_errors():
        from novic.train.nouns import save_nouns, wordnet_nouns
        found = wordnet_nouns(wordnet_dir, min_zipf=min_zipf, max_nouns=max_nouns)
        save_nouns(out, found)
        typer.echo(f"wrote {len(found):,} nouns to {out}")


@app.command()
def cache(config_file: Optional[Path] = typer.Argument(None, help="Config (.json/.toml)."),
          overrides: Optional[List[str]] = OVERRIDE):
    """Build the captions and their embedding cache (resumable) without training."""
    with clear_errors():
        from novic.train.data import load_embedder, prepare_data
        from novic.train.trainer import pick_device
        from novic.train.config import with_checked_embedder
        cfg = with_checked_embedder(_config(config_file, overrides))
        data = prepare_data(cfg, load_embedder(cfg.embedder, pick_device(cfg.device)))
        typer.echo(f"{len(data.captions):,} captions, {len(data.sample_caption):,} targets, "
                   f"{len(data.nouns):,} nouns; cache {data.cache.path}")


@app.command()
def train(config_file: Optional[Path] = typer.Argument(None, help="Config (.json/.toml)."),
          overrides: Optional[List[str]] = OVERRIDE,
          resume: bool = typer.Option(False, "--resume", help="Continue from out_dir/latest.json "
                                      "(without it, an out_dir that holds a run is refused).")):
    """Train (single process, or one rank under torchrun)."""
    with clear_errors():
        from novic.train.trainer import train as run
        cfg = _config(config_file, overrides)
        history = run(cfg, resume=resume)
        final = {k: round(v, 4) for k, v in history[-1].items() if k.startswith("eval/")}
        typer.echo(f"done: {cfg.out_dir} {json.dumps(final)}")


def main():
    run_app(app, *USER_ERRORS, extra="train")

if __name__ == "__main__":
    main()
