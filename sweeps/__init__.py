"""Ray Tune sweeps over the distillation core (the Ray layer; the core never imports ray)."""
