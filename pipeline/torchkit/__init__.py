"""The torch toolkit stages share: model handles and runners, data, training, evaluation, complexity, GPU detection."""
