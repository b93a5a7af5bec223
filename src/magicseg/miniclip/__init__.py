"""The miniature of CLIP for the offline world: what downloading CLIP is in the paper's setting.

- :mod:`magicseg.miniclip.corpus`: a procedural image-caption corpus (its own seeds; captions
  over every catalogue word, held-out classes included; no masks), drawn with
  :mod:`magicseg.scene`;
- :mod:`magicseg.miniclip.model`: the image tower (a GroupNorm CNN stem and a few pre-LN
  transformer layers that take deep prompt tokens) and its checkpoint;
- :mod:`magicseg.miniclip.text`: the frozen text tower (all-MiniLM-L6-v2);
- :mod:`magicseg.miniclip.pretrain`: LiT-style contrastive training of the image tower against
  the frozen text tower, and its zero-shot classification report (stage ``pretrain``).

Importing this package loads no torch.
"""
