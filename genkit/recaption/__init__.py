"""Recaptioning webdataset shards with a vision-language model (Recap-DataComp-1B, arXiv 2406.08478).

``genkit recaption SHARDS --model DIR --out OUT`` streams shards through DataLoader workers (decode,
check, preprocess, left-pad), captions batches greedily with any local image-text-to-text model (LLaVA
family first), and writes one Parquet table + done marker per shard, resumable and exactly-once, on one
process or many (rank-strided shards).  See :mod:`genkit.recaption.pipeline` for the output layout.
"""

from genkit.recaption.pipeline import PAPER_PROMPT, RecaptionConfig, recaption
from genkit.recaption.shards import StreamError, expand_shards, iter_tar_samples, shard_name

__all__ = ["PAPER_PROMPT", "RecaptionConfig", "recaption", "StreamError", "expand_shards", "iter_tar_samples",
           "shard_name"]
