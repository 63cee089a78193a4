"""The embedded demonstrator's world: procedural chest phantoms, their captions and analytic scorer, and the
recipe that trains and proves the embedded model on them.

Why one package: the renderer, the scorer and the recipe belong together and sit BELOW the stages
(finetune, inference, eval, textremoval and bench import it; it imports only cxrcommon and third-party
packages; tests/test_phantoms.py checks that). Modules:
  generator   PhantomSpec, sample_spec, labels, render
  captions    caption, long_report
  dataset     item, make_dataset (`python -m phantoms.dataset`)
  score       the analytic scorer (classify_effusion, classify_pneumothorax, read_sex, read_age_band, measure, ...) and
              `python -m phantoms.score DIR --out reads.csv`
  calibrate   labelled phantom sets and threshold calibration (`python -m phantoms.calibrate`)
  recipe      the embedded recipe and LoRA proof as data: prompts, configs, training data, adherence scoring;
              their drivers are finetune.embedded and finetune.lora_proof
"""
