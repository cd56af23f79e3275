"""Teacher-student distillation in the training loop (`distill.*` in the config).

    loss per trained token = (1 - alpha) * CE + alpha * s * KL(p_teacher,T || p_student,T),  s = T^2 or 1

The teacher is a frozen bigtrain model in the student's tensor-parallel layout, outside the DeepSpeed engine (no
optimizer state, no gradients, not in checkpoints); it runs its forward on each microbatch in the same step.
The KL is computed on the tensor-parallel logit shards without gathering the vocabulary (kl.py). The T^2
convention (on by default, `distill.scale_by_t2`) follows Hinton et al.: the KD gradients scale as 1/T^2, so
multiplying by T^2 keeps `alpha` meaning the same mix at any temperature. Pipeline parallelism is refused at
start-up (the teacher's logits would be needed on the last stage for a model split across all stages).

Here: the KL (kl.py) and the teacher (teacher.py). What plugs it into the loop is a Callback,
bigtrain/train/distillation.py.
"""
from .kl import vocab_parallel_kl
from .teacher import check_compatible, identity_of, load_teacher

__all__ = ["vocab_parallel_kl", "load_teacher", "check_compatible", "identity_of"]
