"""Speech/AV feature helpers for the features, kmeans and labels stages: Kaldi MFCCs with
torchaudio-style deltas (``mfcc``), shard files (``shards``), k-means backends (``kmeans``)."""
