"""RGNet: a unified retrieval and grounding network for long-video temporal grounding (plain PyTorch).

Glossary: the letters every shape comment in this package uses, defined once here.

==========  =====================================================================================================
T           frames of a video (features at the dataset's fps)
W           frames per window (``windows.length_sec`` x fps); S the stride between window starts (default W / 2)
P           windows (proposals): of one video at inference, or the distinct windows of a training batch
Lv          the frame axis of a window tensor (= W; a short last window is padded and masked)
B           queries: of a training step's global batch (``train.batch_size``), or of one video at inference
R, B_r      ranks sharing a training step (processes: 1 locally, ``ray.num_workers`` on Ray); B_r = B / R queries each
N           query-window pairs the encoder runs on
M           pairs the decoder runs on (training: the B positive pairs; inference: K per query)
K           windows decoded per query at inference (``eval.top_k_windows``)
Lq          words (tokens) of a query, padded to the longest of the batch
Dv, Dt      video and text feature widths (``data.video_dim``, ``data.text_dim``)
D, H, F     hidden width, attention heads, FFN width (``model.hidden_dim``, ``num_heads``, ``ffn_dim``)
Q, L        moment queries (anchors) and layers of the grounding decoder
==========  =====================================================================================================

Spans carry their format in the name: ``_cw`` (center, width) relative to a window's valid length inside the model,
``_se`` (start, end), ``_sec`` seconds at the data and evaluation boundaries.
"""

__version__ = "0.1.0"
