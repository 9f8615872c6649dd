"""Emergency-department clinical notes (English or Chinese) generated from the seed.

The note goes into Additional Patient History and Reason for the Requested Procedure; the facts
it states (onset time, GCS, blood pressure, drugs, history) are returned too, so the NER worker
can be tested against known entities.
"""

from __future__ import annotations

from models.phantom.spec import PhantomSpec, rng_for

DRUGS_EN = ["warfarin", "apixaban", "rivaroxaban", "aspirin", "clopidogrel", "dabigatran"]
DRUGS_ZH = {"warfarin": "华法林", "apixaban": "阿哌沙班", "rivaroxaban": "利伐沙班",
            "aspirin": "阿司匹林", "clopidogrel": "氯吡格雷", "dabigatran": "达比加群"}
SYMPTOMS = [("headache", "头痛"), ("vomiting", "呕吐"), ("left-sided weakness", "左侧肢体无力"),
            ("right-sided weakness", "右侧肢体无力"), ("slurred speech", "言语不清"),
            ("confusion", "意识模糊"), ("seizure", "抽搐"), ("dizziness", "头晕")]
CAUSES = [("fall from standing", "站立时跌倒"), ("road traffic accident", "车祸"),
          ("found unresponsive at home", "家中被发现意识不清"), ("sudden onset at rest", "静息时突然起病")]


def clinical_note(spec: PhantomSpec) -> dict:
    """Note text and the facts it states (keys: onset_hours, gcs, sbp, dbp, anticoagulant,
    hypertension, symptoms, cause, age, sex, language)."""
    r = rng_for(spec.seed, "history")
    bleed = bool(spec.subtypes)
    gcs = int(r.integers(6, 15) if bleed else r.integers(13, 16))
    sbp = int(r.integers(150, 215) if bleed else r.integers(110, 170))
    dbp = int(r.integers(70, min(sbp - 30, 125)))
    onset = float(r.choice([0.5, 1, 1.5, 2, 3, 4, 6, 8, 12]))
    htn = bool(r.random() < (0.6 if bleed else 0.35))
    drug = str(r.choice(DRUGS_EN)) if r.random() < (0.35 if bleed else 0.15) else None
    n_sym = int(r.integers(1, 4))
    sym_idx = sorted(r.choice(len(SYMPTOMS), size=n_sym, replace=False).tolist())
    cause = CAUSES[int(r.integers(len(CAUSES)))]
    trauma = "epidural" in spec.subtypes or "subdural" in spec.subtypes
    if trauma and r.random() < 0.7:
        cause = CAUSES[int(r.integers(2))]
    age, sex = spec.age_years, spec.sex
    facts = {"language": spec.language, "age": age, "sex": sex, "onset_hours": onset, "gcs": gcs,
             "sbp": sbp, "dbp": dbp, "hypertension": htn, "anticoagulant": drug,
             "symptoms": [SYMPTOMS[i][0] for i in sym_idx], "cause": cause[0]}
    if spec.language == "zh":
        sx = "男" if sex == "M" else "女"
        onset_s = f"{int(onset * 60)}分钟" if onset < 1 else f"{onset:g}小时"
        parts = [f"患者{sx}，{age}岁，{cause[1]}后{onset_s}。",
                 "主诉" + "、".join(SYMPTOMS[i][1] for i in sym_idx) + "。",
                 f"查体：GCS {gcs}分，血压{sbp}/{dbp}mmHg。"]
        parts.append("既往高血压病史。" if htn else "否认高血压病史。")
        parts.append(f"长期口服{DRUGS_ZH[drug]}。" if drug else "否认抗凝药物使用。")
        parts.append("急查头颅CT平扫，排除颅内出血。")
        reason = "头颅外伤/卒中，排除颅内出血" if trauma else "突发神经功能缺损，排除颅内出血"
    else:
        onset_s = f"{int(onset * 60)} min" if onset < 1 else f"{onset:g} h"
        parts = [f"{age}-year-old {'male' if sex == 'M' else 'female'}, {cause[0]}, "
                 f"onset {onset_s} ago.",
                 "Presents with " + ", ".join(SYMPTOMS[i][0] for i in sym_idx) + ".",
                 f"GCS {gcs}, BP {sbp}/{dbp} mmHg."]
        parts.append("History of hypertension." if htn else "No known hypertension.")
        parts.append(f"On {drug}." if drug else "No anticoagulants.")
        parts.append("Non-contrast CT head to rule out intracranial hemorrhage.")
        reason = "Head trauma, rule out ICH" if trauma else "Acute neurological deficit, r/o ICH"
    return {"text": " ".join(parts) if spec.language != "zh" else "".join(parts),
            "reason": reason, "facts": facts}
