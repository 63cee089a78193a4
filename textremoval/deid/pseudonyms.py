"""Keyed pseudonyms for a de-identification run: the same secret maps the same UID, patient, date shift or
file name to the same new value in every file and process, so the outputs of a run stay linked and a later
run with the same key resumes into the same folder."""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from cxrcommon.errors import MissingFileError, UserError

MAX_SHIFT_DAYS = 3650                 # dates move back 1..3650 days, the same amount for every file of a patient
SECRET_ENV = "SYNTHCXR_DEID_SECRET"   # where --deid-secret is read from when it is not given


class Pseudonymizer:
    """Keyed, stateless replacements: the same secret maps the same UID, patient, date or file to the same
    new value in every file and process of a run (so series and studies stay linked), and records what it
    mapped so `--mapping-out` can write it."""

    def __init__(self, secret: str):
        self.key = secret.encode("utf-8")
        self.mapping: dict[tuple[str, str], str] = {}

    def _digest(self, kind: str, value: str) -> bytes:
        return hmac.new(self.key, f"{kind}\0{value}".encode("utf-8"), hashlib.sha256).digest()

    def uid(self, old: str) -> str:
        new = f"2.25.{int.from_bytes(self._digest('uid', old)[:16], 'big')}"  # a UUID-sized integer
        self.mapping[("uid", old)] = new
        return new

    def patient(self, old: str) -> str:
        new = "ANON-" + self._digest("patient", old).hex()[:12].upper()
        self.mapping[("patient_id", old)] = new
        return new

    def shift_days(self, patient: str) -> int:
        days = -(1 + int.from_bytes(self._digest("shift", patient)[:4], "big") % MAX_SHIFT_DAYS)
        self.mapping[("date_shift_days", patient)] = str(days)
        return days

    def file_name(self, rel: str | Path) -> Path:
        """The output name of input `rel` (its path under the input folder): a keyed hash with the suffix,
        so neither a patient's name in a file or folder name nor the folder layout reaches the outputs."""
        rel = Path(rel)
        new = Path(self._digest("file", rel.as_posix()).hex()[:20] + rel.suffix.lower())
        self.mapping[("file", rel.as_posix())] = new.name
        return new


def resolve_secret(value: str | None) -> str | None:
    """`--deid-secret` as given: 'file:PATH' reads the key from a file (kept out of shell history and `ps`);
    unset falls back to the SYNTHCXR_DEID_SECRET environment variable; None when neither is set."""
    if value and value.startswith("file:"):
        path = Path(value[5:]).expanduser()
        if not path.is_file():
            raise MissingFileError(f"--deid-secret {value}: no such file — give file:PATH of a file holding the key")
        value = path.read_text(encoding="utf-8").strip()
        if not value:
            raise UserError(f"--deid-secret file {path} is empty — put the key in it")
        return value
    return value or os.environ.get(SECRET_ENV) or None


def new_secret() -> str:
    """A random key for one run: without `deid_secret`, UIDs and date shifts link only within the run."""
    return secrets.token_hex(16)
