"""Search spaces as data (``tune_spaces/*.yaml``): parsing and checking, with no dependency on Ray.

A space file is a mapping::

    description: one line shown by ``rgnet tune``
    preset: synthetic-ego4d        # optional: the preset every trial starts from
    fixed:                         # optional: overrides every trial shares (config key -> value)
      train.epochs: 6
    metric: R1@0.3                 # optional: validation metric to maximise (default: train.selection_metric)
    space:                         # config key -> one distribution
      windows.length_sec: {choice: [32.0, 48.0, 64.0]}
      eval.top_k_windows: {int: [3, 10]}            # inclusive bounds
      model.sampler.temperature: {loguniform: [0.1, 2.0]}
      loss.contrastive_weight: {uniform: [0.5, 10.0]}
      model.mask_mode: {grid: [hard, additive]}     # every value, crossed with the other grid keys
    variants:                      # optional: named bundles of overrides, one per trial ("grid") or sampled
      grid:                        # ("choice"); for ablations that change several keys at once
        full: {}
        no_sampler: {model.sampler.kind: none}
    labels:                        # optional: what each variant stands for, shown in ``rgnet ablate`` tables
      no_sampler: "paper Tab. 3, w/o Sampler"

Keys are dotted config paths (``rgnet.config.all_keys``); every key, every value of a choice/grid/variant and both
ends of a range are checked against the config tree when the file is loaded, so a typo fails before any trial
starts.  :func:`trial_overrides` turns one sampled point into ``key=value`` overrides.
"""

from __future__ import annotations

import difflib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rgnet.config import Config, ConfigError, all_keys, apply_overrides, available_presets, load_config

KINDS = ("uniform", "loguniform", "int", "choice", "grid")
VARIANT_KEY = "variant"  # the parameter name under which a variant bundle's name travels in a trial's config


@dataclass(frozen=True)
class Distribution:
    """One searched config key: ``kind`` in KINDS and its arguments (bounds for ranges, values otherwise)."""

    kind: str
    values: tuple[Any, ...]

    @property
    def is_grid(self) -> bool:
        return self.kind == "grid"


@dataclass
class SearchSpace:
    """A parsed, checked space file."""

    path: Path
    description: str
    preset: str | None
    fixed: dict[str, Any]
    metric: str | None
    params: dict[str, Distribution]
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    variant_mode: str = "grid"  # grid | choice
    labels: dict[str, str] = field(default_factory=dict)  # variant -> what it stands for (e.g. the paper's row)

    def base_config(self, overrides: list[str] | tuple[str, ...] = ()) -> Config:
        """The config every trial starts from: preset <- fixed <- caller's overrides."""
        return load_config(self.preset, None, [*_as_overrides(self.fixed), *overrides])

    def num_grid_points(self) -> int:
        """Trials one pass over the grid needs (1 without grid keys or grid variants)."""
        n = math.prod(len(d.values) for d in self.params.values() if d.is_grid)
        return n * (len(self.variants) if self.variants and self.variant_mode == "grid" else 1)


def _as_overrides(values: dict[str, Any]) -> list[str]:
    return [
        f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
        for k, v in values.items()
    ]


def trial_overrides(space: SearchSpace, point: dict[str, Any]) -> list[str]:
    """``key=value`` overrides for one sampled point (config keys, plus the variant's bundle when present)."""
    overrides = []
    for key, value in point.items():
        if key == VARIANT_KEY:
            if value not in space.variants:
                raise ConfigError(f"{space.path}: unknown variant {value!r} (have {', '.join(space.variants)})")
            overrides.extend(_as_overrides(space.variants[value]))
        elif key in space.params:
            overrides.extend(_as_overrides({key: value}))
        else:
            raise ConfigError(f"{space.path}: the sampled point has key {key!r}, which the space does not search")
    return overrides


def _check_key(key: str, valid: set[str], where: str) -> None:
    if key not in valid:
        near = difflib.get_close_matches(key, sorted(valid), n=1)
        hint = f"; did you mean '{near[0]}'?" if near else ""
        raise ConfigError(f"{where}: '{key}' is not a config key{hint}")


def _check_value(base: Config, key: str, value: Any, where: str) -> None:
    try:
        apply_overrides(base, _as_overrides({key: value}))
    except ConfigError as e:
        raise ConfigError(f"{where}: value {value!r} for '{key}' is not accepted: {e}") from e


def _parse_distribution(spec: Any, key: str, base: Config, where: str) -> Distribution:
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(f"{where}: '{key}' must map to one distribution, e.g. {{uniform: [0.1, 1.0]}}; got {spec!r}")
    ((kind, args),) = spec.items()
    if kind not in KINDS:
        near = difflib.get_close_matches(str(kind), KINDS, n=1)
        hint = f"; did you mean '{near[0]}'?" if near else ""
        raise ConfigError(f"{where}: '{key}' has unknown distribution '{kind}' (one of {', '.join(KINDS)}){hint}")
    if not isinstance(args, list) or not args:
        raise ConfigError(f"{where}: '{key}': {kind} needs a non-empty list, got {args!r}")
    if kind in ("uniform", "loguniform", "int"):
        if len(args) != 2 or not all(isinstance(a, int | float) and not isinstance(a, bool) for a in args):
            raise ConfigError(f"{where}: '{key}': {kind} needs [low, high] numbers, got {args!r}")
        lo, hi = args
        if not lo < hi:
            raise ConfigError(f"{where}: '{key}': {kind} needs low < high, got [{lo}, {hi}]")
        if kind == "loguniform" and lo <= 0:
            raise ConfigError(f"{where}: '{key}': loguniform needs low > 0, got {lo}")
        if kind == "int" and not (isinstance(lo, int) and isinstance(hi, int)):
            raise ConfigError(f"{where}: '{key}': int needs integer bounds, got [{lo}, {hi}]")
    if kind in ("choice", "grid") and len(set(map(repr, args))) != len(args):
        raise ConfigError(f"{where}: '{key}': {kind} lists a value twice: {args!r}")
    for value in args:  # both ends of a range, or every listed value, must be a valid setting
        _check_value(base, key, value, where)
    return Distribution(str(kind), tuple(args))


def load_space(path: str | os.PathLike[str]) -> SearchSpace:
    """Read and check a space file; errors name the file and the key."""
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except OSError as e:
        raise ConfigError(f"cannot read search space {p}: {e.strerror}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"search space {p} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"search space {p} must hold a mapping at the top level")
    allowed = {"description", "preset", "fixed", "metric", "space", "variants", "labels"}
    unknown = set(data) - allowed
    if unknown:
        raise ConfigError(f"search space {p}: unknown top-level keys {sorted(unknown)} (allowed: {sorted(allowed)})")
    preset = data.get("preset")
    if preset is not None and preset not in available_presets():
        raise ConfigError(f"search space {p}: unknown preset '{preset}' (available: {', '.join(available_presets())})")
    valid = set(all_keys())
    fixed = data.get("fixed") or {}
    if not isinstance(fixed, dict):
        raise ConfigError(f"search space {p}: 'fixed' must map config keys to values")
    for key in fixed:
        _check_key(key, valid, f"search space {p} (fixed)")
    base = load_config(preset, None, _as_overrides(fixed))
    space = data.get("space") or {}
    variants_spec = data.get("variants") or {}
    if not isinstance(space, dict) or not isinstance(variants_spec, dict):
        raise ConfigError(f"search space {p}: 'space' and 'variants' must be mappings")
    if not space and not variants_spec:
        raise ConfigError(f"search space {p} searches nothing: add keys under 'space' or bundles under 'variants'")
    params = {}
    for key, spec in space.items():
        _check_key(key, valid, f"search space {p}")
        if key in fixed:
            raise ConfigError(f"search space {p}: '{key}' is both fixed and searched")
        params[key] = _parse_distribution(spec, key, base, f"search space {p}")
    variants: dict[str, dict[str, Any]] = {}
    mode = "grid"
    if variants_spec:
        if len(variants_spec) != 1 or next(iter(variants_spec)) not in ("grid", "choice"):
            raise ConfigError(
                f"search space {p}: 'variants' must hold exactly one of grid: or choice: with named bundles"
            )
        ((mode, bundles),) = variants_spec.items()
        if not isinstance(bundles, dict) or not bundles:
            raise ConfigError(f"search space {p}: variants.{mode} must map names to override bundles")
        for name, bundle in bundles.items():
            bundle = bundle or {}
            if not isinstance(bundle, dict):
                raise ConfigError(f"search space {p}: variant '{name}' must map config keys to values")
            for key in bundle:
                _check_key(key, valid, f"search space {p} (variant '{name}')")
                if key in params:
                    raise ConfigError(f"search space {p}: variant '{name}' sets '{key}', which is also searched")
            try:
                apply_overrides(base, _as_overrides(bundle))
            except ConfigError as e:
                raise ConfigError(f"search space {p}: variant '{name}' is not a valid config: {e}") from e
            variants[str(name)] = dict(bundle)
    labels = data.get("labels") or {}
    if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
        raise ConfigError(f"search space {p}: 'labels' must map variant names to text")
    unknown_labels = sorted(str(k) for k in labels if str(k) not in variants)
    if unknown_labels:
        raise ConfigError(
            f"search space {p}: labels name unknown variant(s) {', '.join(unknown_labels)} "
            f"(the variants are {', '.join(variants) or 'none'})"
        )
    metric = data.get("metric")
    return SearchSpace(
        p,
        str(data.get("description", "")),
        preset,
        dict(fixed),
        metric,
        params,
        variants,
        mode,
        {str(k): v for k, v in labels.items()},
    )
