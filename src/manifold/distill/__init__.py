"""distill: a student trained toward a teacher's next-token distributions.

`losses` holds the divergences (forward / reverse KL, GKD's generalised JSD) and the loss
`w * T^2 * D + (1 - w) * CE`; `teacher` loads a frozen teacher and checks it against the
student's data; `step` is the distillation train step (online, from the top-k `cache`, or
on the student's own samples); `generate` writes the teacher's samples as training data
(sequence distillation).
"""
