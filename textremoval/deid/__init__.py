"""DICOM de-identification for `textremoval.clean --deidentify` (docs/DEIDENTIFY.md): `profile` applies the
PS3.15 Basic Profile and its Options to a header, `scrubber` finds identifiers and cuts them from free text
and OCR text, `pseudonyms` holds the run's key, `pixels` is the verified pixel pass, `files` and `audit` say
what a run writes, and `writer` puts one file through all of it."""
