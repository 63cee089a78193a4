"""LoRA / full fine-tuning of SD 2.1-base on report-CXR pairs (`python -m finetune.train`)."""
