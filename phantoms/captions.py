"""Report captions for phantoms: a short radiology-style report per spec, and a long one for prompts past
CLIP's 77 tokens.

Why: the text side of every phantom pair. Wording varies (the model must learn findings, not one sentence)
while every finding the spec holds is named, on the right side, and nothing the spec lacks."""
from __future__ import annotations

import numpy as np

from .generator import PhantomSpec


def _pneumothorax_grade(f: float) -> str:
    return "small" if f < 0.22 else "moderate" if f < 0.32 else "large"


def _lobe(side: str, zone: str, rng: np.random.Generator) -> str:
    """A zone in varied words: 'right lower lobe', 'left lung base', 'lingula' ..."""
    if side == "right":
        lobe = {"upper": "upper", "mid": "middle", "lower": "lower"}[zone]
    else:
        lobe = {"upper": "upper", "mid": "upper", "lower": "lower"}[zone]
    options = [f"{side} {lobe} lobe", f"{side} {zone} lung zone"]
    if zone == "lower":
        options.append(f"{side} lung base")
    if zone == "upper":
        options.append(f"{side} apex")
    if side == "left" and zone == "mid":
        options.append("lingula")
    return str(rng.choice(options))


def caption(spec: PhantomSpec, rng: np.random.Generator) -> str:
    """A short radiology-style report in varied wording, fitting CLIP's 77 tokens."""
    c = lambda opts: str(rng.choice(opts))  # noqa: E731
    findings: list[str] = []
    if spec.effusion != "none":
        size = spec.effusion_size
        if spec.effusion == "bilateral":
            findings.append(c([f"{size.capitalize()} bilateral pleural effusions.",
                               f"Bilateral {size} pleural effusions.",
                               f"There are {size} bilateral pleural effusions."]))
        else:
            side = spec.effusion
            opts = [f"{size.capitalize()} {side} pleural effusion.",
                    f"{size.capitalize()} {side}-sided pleural effusion.",
                    f"There is a {size} {side} pleural effusion.",
                    f"{side.capitalize()} pleural effusion, {size} in size."]
            if size == "small":
                opts.append(f"Blunting of the {side} costophrenic angle from a small effusion.")
            findings.append(c(opts))
    if spec.cardiomegaly:
        grade = "mild" if spec.ctr < 0.60 else "moderate" if spec.ctr < 0.65 else "severe"
        findings.append(c(["Heart size is enlarged.", "Cardiomegaly.", "The cardiac silhouette is enlarged.",
                           f"{grade.capitalize()} cardiomegaly.", "Enlarged heart."]))
    if spec.consolidation != "none":
        side, zone = spec.consolidation.split("_")
        where = _lobe(side, zone, rng)
        findings.append(c([f"Consolidation in the {where}.", f"Airspace opacity in the {where}.",
                           f"{where[0].upper() + where[1:]} opacity, concerning for pneumonia.",
                           f"Focal consolidation of the {where}."]))
    if spec.pneumothorax != "none":
        side, grade = spec.pneumothorax, _pneumothorax_grade(spec.pneumothorax_size)
        findings.append(c([f"{grade.capitalize()} {side} pneumothorax.", f"There is a {side} pneumothorax.",
                           f"{side.capitalize()}-sided pneumothorax with a visible pleural line.",
                           f"{grade.capitalize()} {side} apical pneumothorax."]))
    if spec.nodule != "none":
        side, zone = spec.nodule.split("_")
        mm = int(round(spec.nodule_radius * 2 * 350))  # a 350 mm wide film
        where = _lobe(side, zone, rng)
        findings.append(c([f"{mm} mm nodule in the {where}.", f"A pulmonary nodule in the {where}.",
                           f"Nodular opacity in the {where}."]))
    devices = []
    if "et_tube" in spec.devices:
        devices.append(c(["Endotracheal tube in place.", "ET tube terminates above the carina.",
                          "The endotracheal tube is in standard position."]))
    if "central_line" in spec.devices:
        devices.append(c(["Right central venous catheter with tip in the SVC.", "Right central line in place.",
                          "Right-sided central line terminates in the superior vena cava."]))
    if "pacemaker" in spec.devices:
        devices.append(c(["Left-sided pacemaker with leads in the right heart.", "Cardiac pacemaker in place.",
                          "Left chest wall pacemaker device."]))
    rng.shuffle(findings)
    sentences = devices + findings if rng.random() < 0.6 else findings + devices
    if not findings:
        sentences.append(c(["No acute cardiopulmonary process.", "No acute cardiopulmonary abnormality.",
                            "Lungs are clear. Heart size is normal.", "Normal chest radiograph.",
                            "Clear lungs. No pleural effusion or pneumothorax.",
                            "The lungs are clear. No effusion, consolidation or pneumothorax."]))
    else:
        optional = []
        if not spec.cardiomegaly:
            optional.append(c(["Heart size is normal.", "Normal cardiac silhouette."]))
        if spec.pneumothorax == "none":
            optional.append("No pneumothorax.")
        if spec.effusion == "none":
            optional.append("No pleural effusion.")
        sentences += [s for s in optional if rng.random() < 0.3][:2]
    return " ".join(sentences)


# Report text that says nothing a phantom could contradict, age and sex included (the phantoms draw their
# cues): history, technique and normal anatomy in MIMIC's words. Put before a caption it pushes the finding
# past CLIP's 77th token (long_report).
FILLER = (
    ("History of shortness of breath and cough for three days, evaluate for pneumonia.",
     "Chest pain and dyspnea in a patient with known coronary artery disease.",
     "Fever and productive cough, rule out infiltrate."),
    ("Single frontal view of the chest was obtained with the patient in the upright position.",
     "PA and lateral views of the chest were obtained and compared with the prior examination.",
     "A portable AP radiograph of the chest was acquired at the bedside."),
    ("The trachea is midline and the mediastinal contours are within normal limits.",
     "Hilar contours are unremarkable without evidence of lymphadenopathy.",
     "The cardiomediastinal silhouette is unchanged in appearance from the prior study."),
    ("The visualized osseous structures are intact without acute fracture or dislocation.",
     "The thoracic spine is partially imaged and its alignment is maintained.",
     "There are no displaced rib fractures and the soft tissues are unremarkable."),
    ("The upper abdomen is unremarkable and there is no free air under the diaphragm.",
     "The pulmonary vasculature is within normal limits without evidence of vascular congestion.",
     "No interstitial edema is seen and the bronchovascular markings are normal."),
)


def long_report(short: str, rng: np.random.Generator, tokenizer: object, min_tokens: int = 80) -> str:
    """`short` (a caption) behind filler sentences of at least `min_tokens` CLIP tokens, so a pipeline
    that reads only 77 tokens never sees the finding: the shape of a MIMIC findings section."""
    pool = [sentence for group in FILLER for sentence in group]
    order = rng.permutation(len(pool))
    filler: list[str] = []
    for i in order:
        filler.append(pool[i])
        if len(tokenizer(" ".join(filler), add_special_tokens=False)["input_ids"]) >= min_tokens:
            break
    return " ".join(filler + [short])
