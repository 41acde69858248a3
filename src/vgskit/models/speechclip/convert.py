"""Released SpeechCLIP checkpoints → :class:`~vgskit.models.speechclip.SpeechCLIP` (``vgskit convert speechclip``).

:func:`load_reference_checkpoint` maps the trained weights of the reference implementation's Lightning
checkpoints onto our model: branch, layer-weight and temperature keys are renamed
(:func:`~vgskit.models.speechclip.blocks.convert_speechclip_state_dict`), the frozen towers are dropped (ours
load their own pretrained weights), and the stored keyword table is matched row by row against the text
tower's token embedding, which recovers the keyword vocabulary's token ids (the reference stores the rows in
its own order, not sorted by id).
"""

from __future__ import annotations

import copy
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vgskit.errors import ConfigError, VGSKitError
from vgskit.models.speechclip.blocks import REFERENCE_LOSS_BUFFERS, convert_speechclip_state_dict
from vgskit.models.speechclip.model import SpeechCLIP, SpeechCLIPConfig
from vgskit.models.stand_in_pickle import UnpickledObject, stand_in_pickle_module

#: Reference key of the cascaded branch's (reduced) keyword table, and the same table held by the CLIP tower.
REFERENCE_TABLE_KEYS = ("cascaded_branch.clip.model.token_embedding.weight", "clip.model.token_embedding.weight")
#: Reference key prefixes of the frozen towers; our towers load their own pretrained weights instead.
REFERENCE_TOWER_PREFIXES = ("clip.", "audio_encoder.", "cascaded_branch.clip.")


@dataclass
class ReferenceConversion:
    """What :func:`convert_reference_checkpoint` did with a reference checkpoint.

    Attributes:
        loaded: our state-dict keys filled from the checkpoint.
        defaulted: our keys the checkpoint does not hold, kept at their configured value (a fixed loss
            temperature, the quantiser temperature, BatchNorm's batch counter).
        dropped: reference keys not used: the frozen towers (``clip.*``, ``audio_encoder.*``) and the loss's
            constant mask buffers (``criterion.eye_mat``, ``criterion.neg_eye_mat``, ``criterion.eye_mat_fl``).
        keyword_vocab: CLIP token ids of the keyword table's rows, in the checkpoint's row order (``None``
            without the cascaded branch).
        keyword_vocab_source: ``"checkpoint"`` (recovered from the table's rows), ``"config"`` (the
            configured ids, checked against the table) or ``"config, unchecked"`` (no table in the checkpoint).
    """

    loaded: list[str]
    defaulted: list[str]
    dropped: list[str]
    keyword_vocab: list[int] | None
    keyword_vocab_source: str | None


def read_reference_checkpoint(path: str | Path, *, allow_pickle: bool = False) -> dict[str, Tensor]:
    """The reference state dict of a released SpeechCLIP checkpoint file.

    Accepts a Lightning ``.ckpt`` (a dict with ``state_dict``, ``hyper_parameters``, ...), a saved bare state
    dict, or a ``.safetensors`` file. Files are read with ``torch.load(weights_only=True)``, which runs no
    code from the file. The released ``.ckpt`` files also pickle the reference code's config object, which
    that refuses: ``allow_pickle=True`` unpickles them fully (only for files you trust: unpickling can run
    code), with stand-ins (:class:`UnpickledObject`) for classes that are not installed.

    Raises:
        VGSKitError: the file is missing, unreadable, refused by the safe loader (the message names the
            pickled object and both ways out), or holds no state dict of tensors.
    """
    p = Path(path)
    if not p.is_file():
        raise VGSKitError(f"checkpoint {p}: file not found")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(p)))
        except Exception as err:  # safetensors raises its own error types
            raise VGSKitError(f"checkpoint {p}: not a readable safetensors file ({err})") from None
    try:
        if allow_pickle:
            obj = torch.load(p, map_location="cpu", weights_only=False, pickle_module=stand_in_pickle_module())
        else:
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # The safe loader names the Python object it refused ("Unsupported global: GLOBAL module.Class").
        refused = not allow_pickle and any(w in str(err) for w in ("GLOBAL", "Unsupported global", "Unsupported class"))
        if not refused:  # not a pickle at all, or a broken one
            raise VGSKitError(f"checkpoint {p}: torch.load cannot read it (UnpicklingError: {err})") from None
        named = re.search(r"GLOBAL ([\w.]+)", str(err))
        what = f" ({named.group(1)})" if named else ""
        raise VGSKitError(
            f"checkpoint {p}: holds pickled Python objects besides tensors{what}, which the safe loader "
            "(torch.load(weights_only=True)) refuses; released SpeechCLIP .ckpt files pickle their training "
            "config in hyper_parameters. If you trust the file, pass --allow-pickle (allow_pickle=True); or "
            "save its state dict alone once, in an environment that can unpickle it: "
            "torch.save(torch.load(CKPT, weights_only=False)['state_dict'], 'state_dict.pt')"
        ) from None
    except Exception as err:  # a truncated or foreign file: torch raises RuntimeError, EOFError, ...
        raise VGSKitError(f"checkpoint {p}: torch.load cannot read it ({type(err).__name__}: {err})") from None
    return _state_dict_of(obj, str(p))


def _state_dict_of(obj: Any, where: str) -> dict[str, Tensor]:
    # A Lightning checkpoint holds the weights under "state_dict"; a bare state dict is the weights.
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj:
        raise VGSKitError(f"checkpoint {where}: expected a state dict (or a Lightning checkpoint with "
                          f"'state_dict'), got {type(obj).__name__}")
    bad = [str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise VGSKitError(f"checkpoint {where}: state-dict entries that are not tensors: {bad[:5]}")
    return dict(obj)


def _resolve_config(config: SpeechCLIPConfig | str | Mapping[str, Any]) -> tuple[SpeechCLIPConfig, str | None]:
    from vgskit.models.registry import merge_config, model_config

    if isinstance(config, SpeechCLIPConfig):
        return copy.deepcopy(config), None
    if isinstance(config, str):
        resolved, name = model_config(config), config
    elif isinstance(config, Mapping):
        overrides = dict(config)
        name = overrides.pop("name", None)
        resolved = (model_config(str(name), **overrides) if name
                    else merge_config(SpeechCLIPConfig(), overrides, where="SpeechCLIPConfig"))
    else:
        raise ConfigError(f"config: expected a SpeechCLIPConfig, a registered name or a mapping, got "
                          f"{type(config).__name__}")
    if not isinstance(resolved, SpeechCLIPConfig):
        raise ConfigError(f"config: model {name!r} is not a SpeechCLIP model")
    return resolved, None if name is None else str(name)


def match_token_rows(rows: Tensor, table: Tensor, *, where: str = "keyword table", chunk_size: int = 512) -> list[int]:
    """The id of the row of ``table [N, D]`` that each row of ``rows [V, D]`` copies.

    A released cascaded checkpoint stores its keyword vocabulary as a copy of CLIP's token embedding rows,
    in the reference's own order, without the ids. Each row is matched to its nearest table row and must
    equal it up to float16 rounding (the reference may have run CLIP in half precision).

    Raises:
        ConfigError: a row matches no table row (another CLIP checkpoint), or two rows match the same id.
    """
    if rows.ndim != 2 or table.ndim != 2 or rows.shape[1] != table.shape[1]:
        raise ConfigError(f"{where}: rows {tuple(rows.shape)} do not fit the text tower's token embedding "
                          f"{tuple(table.shape)} (another CLIP size?)")
    rows, table = rows.detach().float().cpu(), table.detach().float().cpu()
    tol = 1e-3 * float(table.abs().max()) + 1e-8
    t2 = table.pow(2).sum(-1)  # [N]
    ids: list[int] = []
    for start in range(0, rows.shape[0], chunk_size):
        block = rows[start:start + chunk_size]  # [b, D]
        dist = block.pow(2).sum(-1, keepdim=True) + t2 - 2 * block @ table.T  # [b, N]
        nearest = dist.argmin(dim=-1)  # [b]
        diff = (block - table[nearest]).abs().amax(dim=-1)  # [b]
        bad = (diff > tol).nonzero().flatten().tolist()
        if bad:
            first = start + bad[0]
            raise ConfigError(
                f"{where}: {len(bad)}+ row(s) equal no token embedding of the text tower (row {first}: max |diff| "
                f"{float(diff[bad[0]]):.3g} to its nearest token); the checkpoint was trained with another "
                "CLIP text tower than the configured one"
            )
        ids.extend(int(i) for i in nearest)
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise ConfigError(f"{where}: several rows equal the same token embedding (ids {dup})")
    return ids


def _defaultable(model: SpeechCLIP) -> set[str]:
    # Keys a reference checkpoint may leave out because the config fixes their value.
    keys = {"cascaded.vq.temperature", "cascaded.batchnorm.bn.num_batches_tracked"}
    if not model.config.learnable_temperature:
        keys.add("loss.logit_scale")  # the reference keeps a fixed temperature out of its state dict
    return keys


def _check_keyword_projection(model: SpeechCLIP, converted: Mapping[str, Tensor], where: str) -> None:
    # The keyword projection is one Linear in the released configs and an MLP in a pre-release cascaded-large
    # one; a mismatch would otherwise surface as a list of stray keys, without the setting to change.
    if model.cascaded is None:
        return
    layers = sorted((int(m.group(1)), v) for k, v in converted.items()
                    if (m := re.fullmatch(r"cascaded\.proj\.sequential\.(\d+)\.weight", k)))
    configured = tuple(model.config.cascaded.projection_hidden_dims)
    if layers:
        hidden = [int(v.shape[0]) for _, v in layers[:-1]]
        if not configured:
            raise ConfigError(f"checkpoint {where}: its cascaded branch projects the keywords with an MLP "
                              f"(linear_proj.sequential.*, a pre-release configuration), the config with one Linear; "
                              f"set cascaded.projection_hidden_dims: {hidden}")
    elif configured and "cascaded.proj.weight" in converted:
        raise ConfigError(f"checkpoint {where}: its cascaded branch projects the keywords with one Linear "
                          f"(linear_proj.weight), the config with an MLP (cascaded.projection_hidden_dims: "
                          f"{list(configured)}); set cascaded.projection_hidden_dims: []")


def convert_reference_checkpoint(
    source: str | Path | Mapping[str, Any],
    config: SpeechCLIPConfig | str | Mapping[str, Any],
    *,
    allow_pickle: bool = False,
) -> tuple[SpeechCLIP, ReferenceConversion]:
    """A :class:`SpeechCLIP` holding the trained weights of a released reference checkpoint, and a report.

    Args:
        source: a checkpoint file (see :func:`read_reference_checkpoint`), a Lightning checkpoint dict or
            its ``state_dict`` (keys as in ``KWClip_GeneralTransformer``: ``parallel_branch.*``,
            ``cascaded_branch.*``, ``criterion.temperature``, ``audio_encoder.weightedsum_layer.weights``,
            the frozen ``clip.*`` / ``audio_encoder.*`` towers).
        config: the model to build: a :class:`SpeechCLIPConfig`, a registered name
            (``"speechclip_parallel_base"``) or a mapping of overrides with an optional ``name`` (a recipe's
            ``model`` section). Its branches must be those the checkpoint trained.
        allow_pickle: let :func:`read_reference_checkpoint` unpickle a trusted file.

    The frozen towers are not taken from the checkpoint: ours load their pretrained weights from the
    config's hub names or folders. The cascaded branch's keyword table is not kept either (ours reads the
    rows from the text tower): its rows are matched to the text tower's token embedding, which recovers the
    keyword vocabulary's token ids in the checkpoint's row order. A configured ``keyword_vocab`` must hold
    the same ids (the row order does not change the outputs; the checkpoint's order is kept).
    ``vocab_from_captions`` is not applied: the vocabulary comes from the checkpoint.

    Raises:
        ConfigError: keys that belong to no SpeechCLIP module or to a branch the config lacks, trained weights
            the checkpoint lacks, sizes that differ from the config, or a keyword table that does not match
            the text tower / the configured ``keyword_vocab``. Every message names the checkpoint.
    """
    if isinstance(source, Mapping):
        where = "reference state dict"
        state = _state_dict_of(source, where)
    else:
        where = str(source)
        state = read_reference_checkpoint(source, allow_pickle=allow_pickle)
    cfg, name = _resolve_config(config)

    trained = {b for b, prefix in (("parallel", "parallel_branch."), ("cascaded", "cascaded_branch."))
               if any(k.startswith(prefix) for k in state)}
    if not trained:
        raise ConfigError(f"checkpoint {where}: no parallel_branch.* or cascaded_branch.* keys; not a SpeechCLIP "
                          f"(KWClip_GeneralTransformer) checkpoint (first keys: {list(state)[:5]})")
    wanted = set(cfg.branch_names)
    if trained != wanted:
        branches = "both" if trained == {"parallel", "cascaded"} else next(iter(trained))
        raise ConfigError(f"checkpoint {where}: it trained the {' and '.join(sorted(trained))} branch(es), the "
                          f"config has {' and '.join(sorted(wanted))}; set branches: {branches}")

    table = next((state[k] for k in REFERENCE_TABLE_KEYS if k in state), None)
    try:
        converted = convert_speechclip_state_dict(state)
    except KeyError as err:
        # The converter names the key inside its branch; report the checkpoint's own key.
        inner = re.search(r"'(.+)'", str(err.args[0]))
        key = next((k for k in state if inner and (k == inner.group(1) or k.endswith("." + inner.group(1)))),
                   err.args[0])
        raise ConfigError(f"checkpoint {where}: unexpected key {key!r}, which belongs to no module of SpeechCLIP's "
                          "parallel or cascaded branch (variants such as KW_CascadedBranch_Integrated or extra "
                          "projection heads are not supported)") from None
    converted.pop("cascaded.token_embedding.weight", None)
    dropped = [k for k in state if (k.startswith(REFERENCE_TOWER_PREFIXES)
                                    and not k.endswith("weightedsum_layer.weights")) or k in REFERENCE_LOSS_BUFFERS]

    given = list(cfg.keyword_vocab) if cfg.keyword_vocab else None
    build = replace(cfg, vocab_from_captions=False)
    model = SpeechCLIP(build)
    vocab_source: str | None = None
    if model.cascaded is not None:
        assert model.text_tower is not None
        if table is None:
            if given is None:
                raise ConfigError(f"checkpoint {where}: no keyword table ({REFERENCE_TABLE_KEYS[0]}) and no "
                                  "keyword_vocab in the config: the keyword vocabulary cannot be recovered")
            vocab_source = "config, unchecked"
        else:
            ids = match_token_rows(table, model.text_tower.token_embedding.weight,
                                   where=f"checkpoint {where}: keyword table {tuple(table.shape)}")
            if given is not None and sorted(given) != sorted(ids):
                extra, lacking = sorted(set(given) - set(ids)), sorted(set(ids) - set(given))
                raise ConfigError(
                    f"checkpoint {where}: its keyword table holds {len(ids)} subwords, the configured keyword_vocab "
                    f"{len(given)}; ids only in the config: {extra[:5]}, only in the checkpoint: {lacking[:5]} "
                    "(leave keyword_vocab empty to take the checkpoint's vocabulary)"
                )
            vocab_source = "config" if given is not None else "checkpoint"
            if ids != model.keyword_token_ids.tolist():
                model.config.keyword_vocab = ids
                model._build_cascaded(int(model.speech_tower.width))
    model.config.vocab_from_captions = cfg.vocab_from_captions

    _check_keyword_projection(model, converted, where)
    ours = set(model.state_dict())
    unexpected = sorted(set(converted) - ours)
    if unexpected:
        raise ConfigError(f"checkpoint {where}: {len(unexpected)} tensor(s) with no place in the model: "
                          f"{unexpected[:8]}")
    missing = sorted(ours - set(converted) - _defaultable(model))
    if missing:
        raise ConfigError(f"checkpoint {where}: it lacks {len(missing)} trained tensor(s) of the model: "
                          f"{missing[:8]}{' ...' if len(missing) > 8 else ''}")
    try:
        model.load_state_dict(converted, strict=False)
    except RuntimeError as err:
        sizes = "; ".join(line.strip() for line in str(err).splitlines() if "size mismatch" in line)
        raise ConfigError(f"checkpoint {where}: its tensors do not fit the configured sizes ({sizes or err}); "
                          "check the size (base/large) and the branch settings of the config") from None
    model.model_name = name or f"speechclip_{model.branch_names[0]}_base"
    report = ReferenceConversion(
        loaded=sorted(converted),
        defaulted=sorted(ours - set(converted)),
        dropped=dropped,
        keyword_vocab=model.keyword_token_ids.tolist() if model.cascaded is not None else None,
        keyword_vocab_source=vocab_source,
    )
    return model.eval(), report


def load_reference_checkpoint(
    source: str | Path | Mapping[str, Any],
    config: SpeechCLIPConfig | str | Mapping[str, Any],
    *,
    allow_pickle: bool = False,
) -> SpeechCLIP:
    """:func:`convert_reference_checkpoint` without the report: a released checkpoint as a :class:`SpeechCLIP`.

    The model is in eval mode; ``save_pretrained`` writes it as a vgskit model (``vgskit convert speechclip``).
    """
    return convert_reference_checkpoint(source, config, allow_pickle=allow_pickle)[0]


__all__ = [
    "REFERENCE_TABLE_KEYS",
    "REFERENCE_TOWER_PREFIXES",
    "ReferenceConversion",
    "UnpickledObject",
    "convert_reference_checkpoint",
    "load_reference_checkpoint",
    "match_token_rows",
    "read_reference_checkpoint",
]
