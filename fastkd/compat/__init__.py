"""Drop-ins for other distillation code bases' loss modules.

``fastkd.compat.repdistiller``: RepDistiller's ``distiller_zoo`` and ``crd.criterion.CRDLoss``
(``from fastkd.compat.repdistiller import *``).
"""
