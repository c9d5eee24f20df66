"""What the HufuNet owner side and the detector share: the bundle's scheme name and the public test data.

The owner measures Acc_combined at release on the same public split the
detector later rebuilds, so both read it through :func:`public_dataset`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from auditor.errors import AuditorError

__all__ = ["SCHEME", "DataUnavailable", "public_dataset"]

#: The owner bundle's scheme (the secret HufuNet file's is ``hufunet-secret``).
SCHEME = "hufunet"


class DataUnavailable(AuditorError):
    """The public test split the owner used cannot be rebuilt here."""


def public_dataset(desc: Mapping[str, Any], folder: str | Path | None = None) -> Any:
    """The public data set a HufuNet bundle names, rebuilt and checked against its test-set SHA-256.

    Digits ship with scikit-learn; Fashion-MNIST is read from ``folder`` (its
    IDX files: the detector's option ``public_data``). Raises :class:`DataUnavailable`.
    """
    from auditor.plugins.hufunet import idx
    from auditor.toolkit import data as datasets

    name = desc.get("name")
    if name == "digits":
        seed = desc.get("split_seed")
        data = datasets.digits(split_seed=int(seed) if isinstance(seed, int) else 0)
    elif name == "fashion-mnist":
        if not folder:
            raise DataUnavailable("the HufuNet was trained on Fashion-MNIST: name the folder of its IDX files")
        data = idx.fashion_mnist(Path(str(folder)))
    else:
        raise DataUnavailable(f"the bundle names an unknown public data set {name!r}")
    if data.test_sha256 != desc.get("test_sha256"):
        raise DataUnavailable(
            f"the {name} test split here (SHA-256 {data.test_sha256[:16]}...) is not the one the owner measured on"
        )
    return data
