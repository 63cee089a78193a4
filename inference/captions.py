"""What the model reads for one prompt: the report, with the patient's demographics in front in the form the
model was trained with.

finetune writes that form into the model card (`cxrcommon.demographics.card_template`); generation reads it back,
so a prompt file's `sex` / `age` / `race` reach the model as its training captions carried them. A model whose
card names no form (the stock SD 2.1 base, a LoRA trained without demographics) was never taught to follow
them: a prompt that asks for a patient is then refused, naming the flag that writes them anyway
(--demographics-template), rather than producing images that silently ignore what was asked."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

from cxrcommon.demographics import FORMS, Demographics, card_template, prefix
from cxrcommon.errors import UserError

log = logging.getLogger(__name__)

TEMPLATES = ("auto", *FORMS, "none")  # --demographics-template
ASKED = ("sex", "age", "race", "demographics_template")  # what a manifest row records of the patient asked for


def caption_parts(prompt: str, demographics: Demographics, form: str | None) -> tuple[str, tuple[str, str] | None]:
    """(the text a row asks the model to read before any window cut, and what a cut keeps first: (the text with
    its impression first, the impression), or None to let `fit_windows` find it).

    The text is the normalised report with the patient's demographics in front in `form` (None: no prefix), as
    finetune built its training captions: the prefix stays first whatever a cut reorders or drops."""
    from cxrcommon.reports import normalize_report, salient_order
    text = normalize_report(prompt)
    head = prefix(demographics, form) if form else ""
    if not head:
        return text, None
    ordered, impression = salient_order(text)
    return f"{head} {text}", (f"{head} {ordered}", impression)


def caption(prompt: str, demographics: Demographics, form: str | None) -> str:
    """The caption as the model reads it when it fits (the app's live preview shows this)."""
    return caption_parts(prompt, demographics, form)[0].strip()


def asked_of(d: Demographics, form: str | None) -> dict[str, Any]:
    """The manifest fields that record which patient an image was asked for, and the caption form (all None
    for a prompt without demographics): every generated image's row carries them, so a dataset can be audited."""
    return {"sex": d.sex or None, "age": d.age, "race": d.race or None, "demographics_template": form if d else None}


def asked(rec: Mapping[str, Any]) -> dict[str, Any]:
    """`asked_of`'s fields as a manifest row holds them."""
    return {k: rec.get(k) for k in ASKED}


def model_cards(model_source: str, lora: str | Path | None) -> list[Path]:
    """The folders whose model cards may name the form, most specific first: the LoRA's (it is what was trained
    last), then the model's."""
    folders = [Path(lora).parent if Path(lora).is_file() else Path(lora)] if lora else []
    return folders + [Path(model_source)]


def caption_form(choice: str, cards: Sequence[Path], *, asked_for: int = 0, where: str = "the prompts") -> str | None:
    """The form captions are written in: 'roentgen' or 'chexgen', or None for no prefix.

    Arguments:
      choice (str): --demographics-template: 'auto' (the first card in `cards` that names a form), a form
        (overrides the cards, with a warning where one names another), or 'none' (demographics are left out).
      cards (sequence(Path)): model/LoRA folders to read (`model_cards`).
      asked_for (int): how many prompts carry demographics; with 'auto' and no card naming a form, any is a
        UserError (the model was not trained to follow them).
      where (str): how the error names the prompts (a file, the app's fields).
    """
    if choice not in TEMPLATES:
        raise UserError(f"--demographics-template {choice!r} is not one of {', '.join(TEMPLATES)}")
    found = next((form for form in map(card_template, cards) if form is not None), None)
    if found == "none":  # the most specific card says: trained without demographics
        found = None
    if choice == "none":
        if asked_for:
            log.warning("--demographics-template none: the sex/age/race of %d prompt(s) are left out of the "
                        "captions and the manifest", asked_for)
        return None
    if choice != "auto":
        if found and found != choice:
            log.warning("the model card says captions were written in the %s form; --demographics-template %s "
                        "overrides it", found, choice)
        return choice
    if asked_for and not found:
        raise UserError(f"{where}: {asked_for} prompt(s) ask for a patient's sex/age/race, but no model card "
                        f"({', '.join(p.name for p in cards)}) names a demographics template: the model was not "
                        f"trained with them and would not follow them — pass --demographics-template roentgen "
                        f"(or chexgen) to write them anyway, or none to leave them out")
    if asked_for:
        log.info("captions carry demographics in the %s form (from the model card)", found)
    return found
