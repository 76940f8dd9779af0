"""Class roles: which classes of a model are lesions, organs or tubular structures.

The role decides the post-processing and what the report measures. Each class gets a role from its name:
names with a lesion word (lesion, tumour, polyp, nodule, ...) are **lesions**; organ / anatomy words (liver,
kidney, hippocampus, anterior, ...) are **organs**; vessel words are **tubular** structures. A single class
with neither kind of word is a lesion class; with several classes and no lesion word, the last class is the
lesion class if no class has an organ word either (``predict.py --roles organ,organ`` overrides this, e.g. for
an MSD hippocampus model whose classes are just "1" and "2").
"""
from __future__ import annotations

from errors import ConfigError

ROLES = ("lesion", "organ", "tubular")
LESION_WORDS = ("lesion", "tumor", "tumour", "cancer", "polyp", "nodule", "mass", "metasta", "cyst", "carcinoma",
                "病灶", "肿瘤", "结节", "息肉", "癌")
ORGAN_WORDS = ("organ", "liver", "kidney", "spleen", "pancrea", "lung", "heart", "brain", "prostate", "bladder",
               "stomach", "gallbladder", "colon", "bone", "muscle", "hippocamp", "anterior", "posterior", "optic",
               "disc", "cup", "skin", "breast", "thyroid", "肝", "肾", "脾", "胰", "肺", "心", "脑", "海马", "器官")
TUBULAR_WORDS = ("vessel", "artery", "vein", "aorta", "airway", "血管", "动脉", "静脉", "气道")


def _has(name: str, words: tuple[str, ...]) -> bool:
    n = str(name).lower()
    return any(w in n for w in words)


def class_roles(class_names: list[str]) -> list[str]:
    """Role of each class by name: 'lesion', 'organ' or 'tubular' (rules in the module docstring)."""
    roles = ["lesion" if _has(n, LESION_WORDS) else "tubular" if _has(n, TUBULAR_WORDS)
             else "organ" if _has(n, ORGAN_WORDS) else "" for n in class_names]
    if len(roles) == 1:
        return [roles[0] or "lesion"]
    if "lesion" not in roles and all(r == "" for r in roles):
        roles[-1] = "lesion"
    return [r or "organ" for r in roles]


def check_roles(roles: list[str], n_classes: int) -> list[str]:
    """``roles`` when there is one known role per class; raises :class:`errors.ConfigError` otherwise."""
    if len(roles) != n_classes or any(r not in ROLES for r in roles):
        raise ConfigError(f"roles {roles} do not fit the model's {n_classes} class(es) (each one of {ROLES})")
    return list(roles)
