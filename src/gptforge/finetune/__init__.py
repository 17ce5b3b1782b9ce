"""Fine-tuning through the one training loop: full or LoRA, on plain text, chat JSONL or labelled text.

`lora.py` is a module swap applied to a built model from outside; `data.py` turns chat and classification
JSONL into batch samplers with the interface `train` reads shards with; `run.py` wires a base checkpoint,
a data source, a loss and (for LoRA or a classification head) a model transform into `gptforge.train.train`.
"""
