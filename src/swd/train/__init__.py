"""Training loops on accelerate: teacher pretraining (and, later, distillation)."""
