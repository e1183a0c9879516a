"""Does a predictor fit a dataset? The shapes a model is built for (its PredictorConfig) against the ones a dataset
stores (its manifest), compared before any clip runs, so a mismatch is one clear line instead of a raw shape
error, or, worse, a model that runs on a grid it was not built for."""

from __future__ import annotations

# field -> how it is named in the error
FIELDS = {
    "grid": "grid (T, H, W)",
    "enc_dim": "enc_dim (latent D)",
    "action_dim": "action_dim",
    "state_dim": "state_dim",
}


def _field(obj, key):
    """obj[key] of a dict (manifest, PredictorConfig.to_dict()) or obj.key of an object (PredictorConfig,
    ClipDataset, Stream); grids as tuples of ints."""
    v = obj[key] if isinstance(obj, dict) else getattr(obj, key)
    return tuple(int(g) for g in v) if key == "grid" else int(v)


def check_model_matches_data(
    model_config, data_info, model_name: str = "the checkpoint", data_name: str = "the dataset"
) -> None:
    """Raise ValueError (one line naming both values of each differing field) unless the model's grid,
    enc_dim, action_dim and state_dim (when the model takes states) equal the data's. model_config: a
    PredictorConfig or its dict;
    data_info: a dataset manifest dict, a ClipDataset or a Stream."""
    # a model without state input (state_dim 0) ignores the states a dataset may carry
    diffs = [
        f"{FIELDS[k]} is {_field(model_config, k)}, the data's {_field(data_info, k)}"
        for k in FIELDS
        if _field(model_config, k) != _field(data_info, k) and not (k == "state_dim" and _field(model_config, k) == 0)
    ]
    if diffs:
        raise ValueError(f"{model_name} does not fit {data_name}: its {'; its '.join(diffs)}")
