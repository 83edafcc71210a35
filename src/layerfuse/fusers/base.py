"""The contract every fuser keeps: per-layer features in, one (B, N, out_dim) tensor out, one calling convention."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from .._checks import check_grid, check_module_inputs, check_positive_int
from ..features import LayerFeatures
from ..preset_plans import PresetPlan, plan_for
from ..serialization import PretrainedMixin

__all__ = ["Fuser", "check_tapped_layers"]

F = TypeVar("F", bound="Fuser")

# Prefix tokens each tap token mode leaves in front of the patches ("all" depends on the tower).
_PREFIX_OF_TOKENS = {"patch": 0, "cls_patch": 1}


class Fuser(PretrainedMixin, nn.Module):
    """Base class of all fusers.

    A fuser takes a sequence of per-layer features, each (B, N_i, C_i), in the order of its
    `layers` (shallow key/value layers first and the query layer last for the attention fusers), and
    returns one (B, N, `out_dim`) tensor. Subclasses set `in_dims` and `out_dim` in `__init__`
    (so a caller can size the projector) and implement `get_config` (constructor keyword arguments,
    for `save_pretrained`), `reset_parameters` and `extra_repr`.

    Every fuser's `forward` takes the same arguments, so calling code can swap one fuser for another:

    ```text
    fuser(features, grid=None, level_grids=None, *, text=None)
    ```

    - `features`: the per-layer tensors, a list or the [`LayerFeatures`][layerfuse.LayerFeatures] a
      tap returns (which carries its patch grid, layer indices and prefix-token count).
    - `grid`: (H, W) of the patch tokens. Fusers that lay tokens out on the grid use it; the others
      accept it when it fits the tokens. A `grid` that contradicts the one the features carry is an
      error, never silently preferred.
    - `level_grids`: one (H, W) per key/value level, i.e. per input other than the query (the
      deep-query fusers' convention), for levels of different resolution. Fusers whose inputs share
      one token layout accept it when every entry equals the tokens' grid.
    - `text`: the instruction embedding (B, E), used by
      [`InstructionGatedFuser`][layerfuse.InstructionGatedFuser]; any other fuser raises `TypeError`
      when given one, as it cannot honour it.

    A fuser built from a preset ([`from_preset`][layerfuse.Fuser.from_preset]) knows what to tap:
    `layers` (hidden-state indices, in input order), `tokens` (the tap's token mode) and `preset` (the
    [`PresetPlan`][layerfuse.presets.PresetPlan], with its name and depth); its errors at forward time
    name the preset and the depth, and features from a tap of other layers are refused. Other fusers
    have `layers`, `tokens` and `preset` equal to `None`.
    """

    in_dims: tuple[int, ...]
    out_dim: int
    preset: PresetPlan | None = None

    @property
    def num_inputs(self) -> int:
        """How many per-layer tensors `forward` expects."""
        return len(self.in_dims)

    @property
    def uses_text(self) -> bool:
        """Whether `forward` needs the instruction embedding `text` (only a gated
        [`InstructionGatedFuser`][layerfuse.InstructionGatedFuser] does; the others refuse one)."""
        return False

    @property
    def layers(self) -> tuple[int, ...] | None:
        """Hidden-state indices to tap, in input order, when known (a fuser built from a preset); else `None`."""
        return None if self.preset is None else self.preset.layers

    @property
    def tokens(self) -> str | None:
        """The tap's token mode (`"patch"`, `"cls_patch"`, `"all"`) when known; else `None`."""
        return None if self.preset is None else self.preset.tokens

    @classmethod
    def from_preset(
        cls: type[F],
        name: str,
        dim: int,
        depth: int | None = None,
        *,
        tower: nn.Module | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> F:
        """A published configuration by name, made for a stated depth or for a given tower.

        `layerfuse.presets` lists the names, their layers and the paper each comes from
        ([`preset_names`][layerfuse.presets.preset_names]). The fuser carries `layers` and `tokens`, so it says what to tap:
        `LayerTap(vit, fuser.layers, tokens=fuser.tokens)`. On the base class `Fuser` any kind is
        built; on a subclass the preset must build that class.

        Args:
            name: a preset name ([`preset_names`][layerfuse.presets.preset_names]).
            dim: ViT width C.
            depth: the backbone's number of transformer blocks (24 for CLIP ViT-L/14, 27 for
                SigLIP-so400m). Required unless `tower` is given; there is no default.
            tower: the vision tower (any model [`LayerTap`][layerfuse.LayerTap] accepts) or its tap;
                its depth is used.
            device: where to build the parameters. Default: the default device.
            dtype: parameter dtype. Default: the default dtype.

        Returns:
            The fuser, with `layers`, `tokens` and `preset` set.

        Raises:
            TypeError: the preset builds another fuser class; neither `depth` nor `tower` given.
            ValueError: unknown name; a depth at which the preset degenerates (named in the message,
                with the smallest depth the preset supports); `depth` contradicting `tower`.

        Examples:
            >>> fuser = ConcatFuser.from_preset("dense_connector_dci", 1024, depth=24)
            >>> fuser.num_inputs, fuser.out_dim, fuser.tokens
            (24, 3072, 'patch')
            >>> ConcatFuser.from_preset("lin_ed_18", 1024, depth=27).layers
            (20, 25)
        """
        where = f"{cls.__name__}.from_preset"
        plan = plan_for(where, name, depth, tower)
        check_positive_int(where, "dim", dim)
        if not issubclass(plan.fuser_class, cls):
            raise TypeError(
                f"{where}: preset {name!r} builds a {plan.fuser}; use {plan.fuser}.from_preset or "
                "layerfuse.presets.build_fuser"
            )
        return plan.build(dim, device=device, dtype=dtype)  # type: ignore[return-value]

    @classmethod
    def _plan_arguments(cls, dim: int, num_inputs: int, options: dict[str, Any]) -> dict[str, Any]:
        """Constructor keyword arguments for a preset plan of `num_inputs` layers of width `dim`."""
        return {"dim": dim, "num_inputs": num_inputs, **options}

    @classmethod
    def _from_plan(
        cls: type[F],
        plan: PresetPlan,
        dim: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> F:
        fuser = cls(**cls._plan_arguments(dim, len(plan.layers), plan.options), device=device, dtype=dtype)
        fuser.preset = plan
        return fuser

    def _preset_config(self) -> dict[str, Any]:
        """The `preset` entry of `get_config` (empty without one), read back by `from_config`."""
        return {} if self.preset is None else {"preset": self.preset.to_config()}

    @classmethod
    def from_config(
        cls: type[F],
        config: dict[str, Any],
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> F:
        """Build the architecture described by `config`; a `preset` entry restores `layers`/`tokens`."""
        config = dict(config)
        preset = config.pop("preset", None)
        fuser = cls(**config, device=device, dtype=dtype)
        if preset is not None:
            fuser.preset = PresetPlan.from_config(preset)
        return fuser

    def _origin(self) -> str:
        """Where this fuser's input list comes from, for messages (empty unless built from a preset)."""
        plan = self.preset
        if plan is None:
            return ""
        return (
            f" ({plan.describe()} reads hidden states {list(plan.layers)} with tokens={plan.tokens!r}; "
            "tap them with LayerTap(model, fuser.layers, tokens=fuser.tokens))"
        )

    def _call_args(
        self,
        where: str,
        features: object,
        grid: object,
        text: object,
        *,
        uses_text: bool = False,
    ) -> tuple[int, int] | None:
        """The checks every fuser's `forward` starts with (after handing a packed batch to `fuse_packed`).

        The number of inputs (the message names the preset and depth), `text` for a fuser without an
        instruction, the tap's layers and token mode against the fuser's (when both are known), an
        explicit `grid` against the one the features carry, then the inputs' device and dtype against
        the module's (`check_module_inputs`; `text` may have any float dtype). Returns the patch grid:
        `grid`, else the features', else `None`.
        """
        if isinstance(features, Sequence) and not isinstance(features, Tensor) and len(features) != self.num_inputs:
            raise ValueError(f"{where}: features expected {self.num_inputs} tensors, got {len(features)}{self._origin()}")
        if not uses_text and text is not None:
            raise TypeError(
                f"{where}: text (an instruction embedding) is only used by InstructionGatedFuser; "
                f"{type(self).__name__} fuses without an instruction, got {type(text).__name__}"
            )
        plan = self.preset
        check_tapped_layers(where, features, self.layers, None if plan is None else plan.depth)
        if isinstance(features, LayerFeatures) and plan is not None and plan.tokens in _PREFIX_OF_TOKENS:
            expected = _PREFIX_OF_TOKENS[plan.tokens]
            if features.num_prefix_tokens != expected:
                raise ValueError(
                    f"{where}: features carry {features.num_prefix_tokens} prefix token(s) (from the tap) but the "
                    f"fuser expects {expected}; tap with tokens={plan.tokens!r}{self._origin()}"
                )
        carried = getattr(features, "grid", None)
        if grid is None:
            hw = None if carried is None else check_grid(where, carried, name="features.grid")
        else:
            hw = check_grid(where, grid)
            if carried is not None and hw != tuple(carried):
                raise ValueError(
                    f"{where}: grid={hw} contradicts the grid the features carry (features.grid={tuple(carried)}, "
                    "from the tap); pass grid=None to use the features' grid, or tap at the other size"
                )
        if uses_text:
            check_module_inputs(where, self, features=features, text=text, any_dtype=("text",))
        else:
            check_module_inputs(where, self, features=features)
        return hw

    def _check_token_layout(
        self,
        where: str,
        features: object,
        tokens: int,
        grid: tuple[int, int] | None,
        level_grids: object,
        *,
        prefix: int = 0,
    ) -> None:
        """`grid` and `level_grids` for a fuser whose inputs share one token layout.

        Such a fuser has no use for them (or only for `grid`), but accepts them when they describe its
        tokens: the grid covers the N - P patch tokens (P prefix tokens: the features' own count, else
        `prefix`), and `level_grids` has one entry per input other than the query, as the deep-query
        fusers count, each equal to that grid.
        """
        prefix = features.num_prefix_tokens if isinstance(features, LayerFeatures) else prefix
        patches = tokens - prefix
        if grid is not None and grid[0] * grid[1] != patches:
            raise ValueError(
                f"{where}: grid {grid} = {grid[0] * grid[1]} tokens does not fit the features' {patches} patch "
                f"tokens ({tokens} tokens, {prefix} prefix)"
            )
        if level_grids is None:
            return
        if isinstance(level_grids, Tensor) or not isinstance(level_grids, Sequence):
            raise TypeError(
                f"{where}: level_grids expected a sequence of (H, W) pairs, got {type(level_grids).__name__}"
            )
        if len(level_grids) != self.num_inputs - 1:
            raise ValueError(
                f"{where}: level_grids expected {self.num_inputs - 1} (H, W) pairs (one per input other than the "
                f"query, as the deep-query fusers count), got {len(level_grids)}: {list(level_grids)}"
            )
        for i, entry in enumerate(level_grids):
            hw = check_grid(where, entry, name=f"level_grids[{i}]")
            if hw != (grid if grid is not None else hw) or hw[0] * hw[1] != patches:
                raise ValueError(
                    f"{where}: level_grids[{i}]={hw} does not describe the features: every input of "
                    f"{type(self).__name__} shares one layout of {patches} patch tokens"
                    + (f" on grid {grid}" if grid is not None else "")
                )


def check_tapped_layers(where: str, features: object, layers: Sequence[int] | None, depth: int | None) -> None:
    """Refuse features tapped from other hidden states than `layers` (when both are known).

    [`LayerFeatures`][layerfuse.LayerFeatures] keep the indices as the tap was given them, negatives
    included; they are compared as given, or resolved against `depth` when it is known. Indices
    that cannot be compared (a negative index on one side and no depth) are let through.
    """
    tapped = tuple(getattr(features, "layers", ()) or ())
    if layers is None or not tapped or tapped == tuple(layers):
        return
    if depth is not None:
        def absolute(ks: Sequence[int]) -> tuple[int, ...]:
            return tuple(k if k >= 0 else depth + 1 + k for k in ks)

        same = absolute(tapped) == absolute(layers)
    elif any(k < 0 for k in (*tapped, *layers)):
        return
    else:
        same = False
    if not same:
        raise ValueError(
            f"{where}: features were tapped from hidden states {list(tapped)} but the module reads "
            f"{list(layers)}; tap with LayerTap(model, module.layers, tokens=module.tokens)"
        )
