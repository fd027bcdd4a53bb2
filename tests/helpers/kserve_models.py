"""The one KServe deserializer: a manifest (or API response body) into the KServe SDK models.

kserve.ApiClient().deserialize cannot be used for this: it looks nested Kubernetes types
(V1ObjectMeta, V1Container, ...) up in kserve.models only, and it silently drops keys the
models do not declare. ``from_dict`` resolves each class name in kserve.models, then in the
Kubernetes client's models, by the models' own ``openapi_types`` / ``attribute_map``, and
refuses any key a model does not declare (a typo) or a value of the wrong JSON type. The
generated models themselves raise ValueError for a missing required field.
"""

from __future__ import annotations

import re

import kserve
import kubernetes.client.models as k8s_models

_NATIVE = {"str": str, "int": int, "float": (int, float), "bool": bool, "object": object}


def from_dict(data, klass: str):
    """Build SDK objects from ``data`` as type ``klass`` (e.g. "V1beta1InferenceService")."""
    if klass.startswith("list["):
        if not isinstance(data, list):
            raise ValueError(f"{klass}: expected a list, got {data!r}")
        return [from_dict(d, klass[5:-1]) for d in data]
    if klass.startswith("dict("):
        sub = re.match(r"dict\(([^,]*), (.*)\)", klass).group(2)
        return {k: from_dict(v, sub) for k, v in data.items()}
    if klass in _NATIVE:
        if not isinstance(data, _NATIVE[klass]):
            raise ValueError(f"{klass}: expected a {klass}, got {data!r}")
        return data
    cls = getattr(kserve.models, klass, None) or getattr(k8s_models, klass)
    by_json = {cls.attribute_map[a]: (a, t) for a, t in cls.openapi_types.items()}
    unknown = set(data) - set(by_json)
    if unknown:
        raise ValueError(f"{klass} has no field(s) {sorted(unknown)}")
    return cls(**{by_json[k][0]: from_dict(v, by_json[k][1]) for k, v in data.items()})


def to_dict(obj) -> dict:
    """The JSON form of SDK objects (what the API server would receive)."""
    return kserve.ApiClient().sanitize_for_serialization(obj)


def roundtrip(manifest: dict, klass: str = "V1beta1InferenceService"):
    """Deserialize into the SDK models (field names, types, required fields), check that
    serializing gives the manifest back unchanged, return the SDK object."""
    obj = from_dict(manifest, klass)
    assert to_dict(obj) == manifest, f"{klass}: the SDK models do not give the manifest back"
    return obj
