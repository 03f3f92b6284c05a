"""Keyed patient pseudonyms: the only form in which a device's patient id may reach a corpus.

``patient = "p" + HMAC-SHA256(key, device patient id)[:24 hex]``. The key comes from the environment
variable ``OCTSSL_PSEUDONYM_KEY`` so that the same patient maps to the same pseudonym across ingests (and
patient-level splits stay patient-level). Without a key ingest refuses, unless the caller asks for an
ephemeral random key: pseudonyms are then valid for that one run only and a later ingest of the same
patient lands under a different pseudonym (possibly in a different split).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import os
import secrets

from octssl.errors import IngestError

KEY_ENV = "OCTSSL_PSEUDONYM_KEY"
EPHEMERAL_WARNING = (
    f"no {KEY_ENV} set: using an EPHEMERAL pseudonym key. Patients ingested now will NOT match the same "
    "patients in any other ingest (splits by patient can leak across runs). Set the key for real data."
)


def missing_key(command: str) -> str:
    """The line a command that pseudonymises patients says when no key is set."""
    return (f"{command} refuses to run without a pseudonym key: set {KEY_ENV} (any secret string, kept "
            "outside the corpus; one key per corpus) or pass --ephemeral-key for a throw-away run")


def load_key(ephemeral: bool = False, command: str = "ingest") -> tuple[bytes, bool]:
    """The pseudonym key and whether it is ephemeral; IngestError (worded for ``command``) when absent and
    not ``ephemeral``."""
    value = os.environ.get(KEY_ENV, "")
    if value:
        return value.encode("utf-8"), False
    if not ephemeral:
        raise IngestError(missing_key(command))
    return secrets.token_bytes(32), True


#: Manifest setting holding :func:`key_fingerprint` of the key a corpus was ingested with.
FINGERPRINT_SETTING = "key_fingerprint"


def key_fingerprint(key: bytes) -> str:
    """A short, slow-to-invert fingerprint of a pseudonym key (PBKDF2, 200k rounds, fixed salt): a corpus
    records it so that a later ingest with another key is refused, and it never stores the key itself."""
    return "pbkdf2:" + hashlib.pbkdf2_hmac("sha256", key, b"octssl-pseudonym-key-fingerprint", 200_000).hex()[:16]


def check_key(recorded: str | None, key: bytes, corpus: object, command: str) -> None:
    """IngestError unless ``key`` is the key the corpus recorded (a corpus with no record accepts any): two
    keys give one patient two pseudonyms, and the same person could then sit in both train and test."""
    if recorded is None or recorded == key_fingerprint(key):
        return
    raise IngestError(
        f"{corpus}: {command} refused: this corpus was ingested with another pseudonym key (fingerprint "
        f"{recorded}; {KEY_ENV} now gives {key_fingerprint(key)}), so the same patient would get a second "
        f"pseudonym; set {KEY_ENV} to the corpus's key (an --ephemeral-key never matches), or use a new corpus")


def pseudonym(device_patient_id: str, key: bytes) -> str:
    """Keyed, stable pseudonym of a device patient id (no way back without the key)."""
    digest = hmac.new(key, device_patient_id.strip().encode("utf-8"), hashlib.sha256).hexdigest()
    return "p" + digest[:24]


def visit_pseudonym(patient: str, day: str | None, key: bytes) -> int:
    """The manifest ``visit`` of a patient's acquisition day: a keyed number in 1..2**31-1 (0 when the day is
    unknown). The same patient and day give the same visit; without the key no number leads back to a day."""
    if day is None:
        return 0
    digest = hmac.new(key, f"visit:{patient}:{day}".encode(), hashlib.sha256).digest()
    return int.from_bytes(digest[:8], "big") % (2**31 - 1) + 1


#: Corpus setting saying how ``acquired`` is stored: :data:`SHIFTED` (the default) or :data:`REAL` dates.
DATES_SETTING, SHIFTED, REAL = "dates", "shifted", "real"
#: a patient's dates move back by 1 to 10 years (whole days), the same for all of that patient's scans
SHIFT_DAYS = (366, 3653)


def date_shift_days(patient: str, key: bytes) -> int:
    """Days every acquisition date of ``patient`` (a pseudonym) moves back: keyed, so the same patient gets
    the same shift in every ingest with this key and no one without the key can undo it. DICOM PS3.15
    Annex E, "Retain Longitudinal Temporal Information with Modified Dates": intervals stay exact."""
    digest = hmac.new(key, f"date-shift:{patient}".encode(), hashlib.sha256).digest()
    low, high = SHIFT_DAYS
    return low + int.from_bytes(digest[:8], "big") % (high - low + 1)


def shifted_day(day: str | None, patient: str, key: bytes) -> str | None:
    """``day`` (ISO ``YYYY-MM-DD``) moved back by the patient's keyed shift; None stays None."""
    if day is None:
        return None
    return (dt.date.fromisoformat(day) - dt.timedelta(days=date_shift_days(patient, key))).isoformat()


def check_dates(recorded: str | None, has_rows: bool, wanted: str, corpus: object) -> None:
    """IngestError when ``wanted`` dates would mix with the corpus's: a patient's intervals are exact only
    when all of their dates are stored the same way. A corpus with rows but no record predates date
    shifting and holds real dates."""
    stored = recorded or (REAL if has_rows else None)
    if stored is None or stored == wanted:
        return
    hint = ("pass --keep-real-dates to add to it as it is, or ingest into a new corpus (dates shifted)"
            if stored == REAL else "drop --keep-real-dates (this corpus stores shifted dates)")
    raise IngestError(f"{corpus}: this corpus stores {stored} acquisition dates and this ingest would store "
                      f"{wanted} ones; {hint}")
