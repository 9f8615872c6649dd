"""Synthetic emergency notes and head-CT requests (English and Chinese) with exact entity spans.

Deterministic from a seed: the training set and the held-out set come from disjoint seeds
(:data:`TRAIN_SEED`, :data:`HELDOUT_SEED`). Texts mix full sentences, abbreviations ("HTN", "y/o",
"LKW", "r/o"), vital-sign distractors (HR, SpO2, 心率) that are not entities, and negated or
uncertain mentions ("denies warfarin", "否认服用抗凝药物", "? on apixaban") whose truth the
generator records so that the cue rules in :mod:`models.ner.negation` can be checked against it.
All names and numbers are invented; no real patient text was used.
"""

from __future__ import annotations

import random

from models.ner.document import Document
from models.ner.tags import Span

TRAIN_SEED = 1
HELDOUT_SEED = 1_000_003
LANGS = ("en", "zh")


class _Builder:
    def __init__(self) -> None:
        self.parts: list[str] = []
        self.length = 0
        self.spans: list[Span] = []
        self.neg: set[Span] = set()
        self.unc: set[Span] = set()

    def t(self, text: str) -> "_Builder":
        self.parts.append(text)
        self.length += len(text)
        return self

    def e(self, text: str, typ: str, *, neg: bool = False, unc: bool = False) -> "_Builder":
        span = Span(self.length, self.length + len(text), typ)
        self.spans.append(span)
        if neg:
            self.neg.add(span)
        if unc:
            self.unc.add(span)
        return self.t(text)

    def doc(self, lang: str) -> Document:
        return Document("".join(self.parts), self.spans, lang, self.neg, self.unc)


# ----------------------------------------------------------------------------- English
EN_SYMPTOMS = [
    "headache", "severe headache", "sudden severe headache", "thunderclap headache",
    "worst headache of life", "vomiting", "nausea", "left-sided weakness", "right-sided weakness",
    "left hemiparesis", "right hemiparesis", "right arm weakness", "left leg weakness",
    "left facial droop", "facial droop", "slurred speech", "dysarthria", "aphasia",
    "expressive aphasia", "confusion", "altered mental status", "AMS", "loss of consciousness",
    "LOC", "syncope", "seizure", "dizziness", "vertigo", "drowsiness", "unresponsiveness",
    "blurred vision", "double vision", "numbness of the left arm", "neck stiffness", "ataxia",
    "gait instability", "lethargy", "somnolence", "hemiplegia", "word-finding difficulty",
]
EN_ANTICOAG = ["warfarin", "Coumadin", "apixaban", "Eliquis", "rivaroxaban", "Xarelto",
               "dabigatran", "Pradaxa", "edoxaban", "heparin", "enoxaparin", "Lovenox",
               "anticoagulants", "anticoagulation", "blood thinners", "DOAC", "a DOAC",
               "anticoagulant", "anticoagulant medication", "blood thinner", "NOAC"]
EN_ANTIPLT = ["aspirin", "ASA", "clopidogrel", "Plavix", "ticagrelor", "Brilinta", "prasugrel",
              "antiplatelets", "antiplatelet agents", "dual antiplatelet therapy", "DAPT",
              "antiplatelet", "baby aspirin"]
EN_OTHER_MEDS = ["metoprolol", "atorvastatin", "metformin", "lisinopril", "amlodipine",
                 "levothyroxine", "omeprazole", "insulin", "simvastatin", "furosemide"]
EN_HTN = ["HTN", "hypertension", "high blood pressure", "htn", "Hypertension", "hypertensive disease"]
EN_HEM_LOC = ["left basal ganglia", "right basal ganglia", "left thalamic", "right thalamus",
              "left putaminal", "right putamen", "right frontal lobe", "left temporal",
              "left parietal", "right occipital", "cerebellar", "pontine", "intraventricular",
              "subarachnoid", "right cerebellar hemisphere", "brainstem", "left frontoparietal",
              "left lobar", "right temporoparietal", "left caudate"]
EN_FILLER = ["Patient brought in by EMS.", "Family at bedside.", "Allergies: NKDA.",
             "DM2 on metformin.", "Former smoker.", "Lives alone.", "Transferred from outside hospital.",
             "Stroke alert activated.", "Code stroke called by triage.", "Fall at home.",
             "No trauma reported.", "Last seen normal by spouse.", "Hx of AF.", "PMH: hyperlipidemia.",
             "Neuro exam limited.", "Pupils equal and reactive.", "Patient resting comfortably.",
             "Seen by neurology.", "Awaiting imaging.", "Tolerating oral intake.", "Skin warm and dry.",
             "Lungs clear bilaterally.", "Abdomen soft, non-tender.", "IV access obtained.",
             "Labs pending.", "Blood glucose 6.8 mmol/L.", "Weight 82 kg.", "Works as a teacher.",
             "Alert and oriented x3.", "Moving all four limbs.", "History obtained from daughter.",
             "Arrived by private car.", "Temperature 37.2 C.", "Heart regular rate and rhythm.",
             "Social history noncontributory.", "Retired electrician, independent at baseline.",
             "Son reports she was fine at breakfast.", "Interpreter used.", "NPO pending imaging.",
             "Will discuss with the on-call radiologist.", "Wife states he looked pale."]


def _en_age(r: random.Random, age: int) -> str:
    return r.choice([f"{age}-year-old", f"{age} year old", f"{age} yo", f"{age} y/o", f"{age}yo",
                     f"{age} years old"])


def _en_onset(r: random.Random) -> str:
    n = r.choice([1, 2, 3, 4, 5, 6, 8, 10, 12, 18, 24, 36, 48])
    m = r.choice([15, 20, 30, 40, 45, 50, 90])
    return r.choice([
        f"{n} hours ago", f"{n} hrs ago", f"{n}h ago", f"{n} hours", f"{n} hrs", f"{n} h",
        f"{m} min ago", f"{m} minutes ago", f"{m} minutes", f"{m} mins",
        f"{max(1, n // 12)} days", f"{max(1, n // 12)} day ago", "yesterday", "this morning",
        "last night", f"{n}.5 hours ago",
    ])


def _en_sym(r: random.Random, k: int = 1) -> list[str]:
    return r.sample(EN_SYMPTOMS, k)


def _en_join(b: _Builder, items: list[str], typ: str, *, neg: bool = False, unc: bool = False,
             conj: str = "and") -> None:
    for i, item in enumerate(items):
        if i:
            b.t(f" {conj} " if i == len(items) - 1 else ", ")
        b.e(item, typ, neg=neg, unc=unc)


def _en_demo(b: _Builder, r: random.Random) -> None:
    age = r.randint(18, 96)
    sex = r.choice(["male", "female", "man", "woman", "gentleman", "lady"])
    style = r.randrange(4)
    if style == 0:
        b.t(r.choice(["", "Pt is a ", "Patient is a ", "This is a "])).e(_en_age(r, age), "AGE")
        b.t(" ").e(sex, "SEX").t(r.choice([" ", ", "]))
    elif style == 1:
        b.e(_en_age(r, age).replace("-year-old", " y/o"), "AGE").t(" ").e(r.choice(["M", "F"]), "SEX")
        b.t(r.choice([", ", " "]))
    elif style == 2:
        b.t("Age: ").e(str(age), "AGE").t(r.choice([", Sex: ", " Sex: ", "; sex "]))
        b.e(r.choice(["M", "F", "male", "female"]), "SEX").t(". ")
    else:
        b.t(r.choice(["Elderly ", "A ", ""])).e(sex, "SEX").t(", ").e(_en_age(r, age), "AGE")
        b.t(r.choice([", ", ". "]))


def _en_complaint(b: _Builder, r: random.Random) -> None:
    syms = _en_sym(r, r.choice([1, 1, 2, 3]))
    style = r.randrange(6)
    if style == 0:
        b.t(r.choice(["presenting with ", "presents with ", "with "]))
        _en_join(b, syms, "SYMPTOM")
        b.t(r.choice([" since ", " starting ", " for "])).e(_en_onset(r), "ONSET").t(". ")
    elif style == 1:
        b.t("Sudden onset of ")
        _en_join(b, syms, "SYMPTOM")
        b.t(" ").e(_en_onset(r), "ONSET").t(r.choice([".", " prior to arrival.", " PTA."])).t(" ")
    elif style == 2:
        b.t("c/o ")
        _en_join(b, syms, "SYMPTOM")
        b.t(" x ").e(_en_onset(r), "ONSET").t(". ")
    elif style == 3:
        b.t("LKW ").e(_en_onset(r), "ONSET").t(r.choice([". ", ", "]))
        b.t(r.choice(["Found with ", "now with ", "Noted "]))
        _en_join(b, syms, "SYMPTOM")
        b.t(". ")
    elif style == 4:
        b.t("CC: ")
        _en_join(b, syms, "SYMPTOM")
        b.t(r.choice([", onset ", ", started ", " onset "])).e(_en_onset(r), "ONSET").t(". ")
    else:
        b.t("Developed ")
        _en_join(b, syms, "SYMPTOM")
        b.t(" while at rest ").e(_en_onset(r), "ONSET").t(". ")


def _en_gcs(r: random.Random) -> str:
    e, v, m = r.randint(1, 4), r.randint(1, 5), r.randint(1, 6)
    n = e + v + m
    return r.choice([f"GCS {n}", f"GCS {n}/15", f"GCS: {n}", f"GCS E{e}V{v}M{m}",
                     f"Glasgow Coma Scale {n}", f"GCS of {n}", f"GCS={n}"])


def _en_bp(r: random.Random) -> str:
    s, d = r.randint(110, 240), r.randint(60, 135)
    return r.choice([f"BP {s}/{d}", f"BP {s}/{d} mmHg", f"blood pressure {s}/{d} mm Hg",
                     f"B/P: {s}/{d}", f"SBP {s}", f"BP: {s}/{d}", f"BP {s}/{d}mmHg"])


def _en_vitals(b: _Builder, r: random.Random) -> None:
    items: list[tuple[str, str | None]] = [(f"HR {r.randint(50, 130)}", None),
                                           (f"SpO2 {r.randint(88, 100)}%", None),
                                           (f"RR {r.randint(12, 30)}", None)]
    if r.random() < 0.85:
        items.append((_en_bp(r), "BP"))
    if r.random() < 0.6:
        items.append((_en_gcs(r), "GCS"))
    r.shuffle(items)
    items = items[: r.randint(1, len(items))]
    b.t(r.choice(["Vitals: ", "On arrival ", "Exam: ", "", "VS: "]))
    for i, (text, typ) in enumerate(items):
        if i:
            b.t(r.choice([", ", ", ", "; "]))
        if typ:
            b.e(text, typ)
        else:
            b.t(text)
    b.t(". ")


def _en_drugs(b: _Builder, r: random.Random) -> None:
    drug = r.choice(EN_ANTICOAG + EN_ANTIPLT)
    other = r.choice(EN_OTHER_MEDS)
    mode = r.choices(["pos", "neg", "unc"], [0.45, 0.4, 0.15])[0]
    if mode == "pos":
        style = r.randrange(5)
        if style == 0:
            b.t("On ").e(drug, "DRUG").t(r.choice([" for AF. ", " for mechanical valve. ", ". "]))
        elif style == 1:
            b.t("Takes ").e(drug, "DRUG").t(r.choice([" 5 mg BID. ", " daily. ", " 81 mg daily. "]))
        elif style == 2:
            b.t("Meds: ").e(drug, "DRUG").t(f", {other}. ")
        elif style == 3:
            b.t(f"Meds: {other}, ").e(drug, "DRUG").t(". ")
        else:
            b.t("Anticoagulated with ").e(drug, "DRUG").t(f", INR {r.randint(1, 4)}.{r.randint(0, 9)}. ")
    elif mode == "neg":
        style = r.randrange(7)
        if style == 0:
            b.t("No ").e(drug, "DRUG", neg=True).t(". ")
        elif style == 1:
            b.t("Denies ").e(drug, "DRUG", neg=True).t(r.choice([" use. ", ". "]))
        elif style == 2:
            b.t("Not on ").e(drug, "DRUG", neg=True).t(". ")
        elif style == 3:
            b.t("Denies taking ").e(drug, "DRUG", neg=True).t(" or ")
            b.e(r.choice(EN_ANTIPLT), "DRUG", neg=True).t(". ")
        elif style == 4:
            b.t("No ").e(r.choice(["anticoagulants", "anticoagulation", "blood thinners"]), "DRUG", neg=True)
            b.t(" or ").e(r.choice(["antiplatelets", "antiplatelet agents"]), "DRUG", neg=True).t(". ")
        elif style == 5:
            b.e(drug.capitalize() if drug[0].islower() else drug, "DRUG", neg=True).t(": none. ")
        else:
            b.t("Not taking any ").e(drug, "DRUG", neg=True).t(r.choice([". ", f"; takes {other}. "]))
    else:
        style = r.randrange(4)
        if style == 0:
            b.t("Possibly on ").e(drug, "DRUG", unc=True).t(". ")
        elif style == 1:
            b.t("Unclear if taking ").e(drug, "DRUG", unc=True).t(". ")
        elif style == 2:
            b.t("? on ").e(drug, "DRUG", unc=True).t(". ")
        else:
            b.e(drug.capitalize() if drug[0].islower() else drug, "DRUG", unc=True)
            b.t(" status unknown. ")


def _en_htn(b: _Builder, r: random.Random) -> None:
    htn = r.choice(EN_HTN)
    mode = r.choices(["pos", "neg", "unc"], [0.6, 0.3, 0.1])[0]
    if mode == "pos":
        style = r.randrange(4)
        if style == 0:
            b.t("PMH: ").e(htn, "HTN").t(r.choice([", DM2, hyperlipidemia. ", ", CKD. ", ". "]))
        elif style == 1:
            b.t(r.choice(["History of ", "Hx of ", "h/o "])).e(htn, "HTN").t(". ")
        elif style == 2:
            b.t("Hx ").e(htn, "HTN").t(f" x {r.randint(2, 30)} yrs, poorly controlled. ")
        else:
            b.t("Known ").e(r.choice(["hypertensive", "HTN"]), "HTN").t(". ")
    elif mode == "neg":
        b.t(r.choice(["No history of ", "Denies ", "No known ", "No h/o "])).e(htn, "HTN", neg=True).t(". ")
    else:
        b.t(r.choice(["Possible ", "Suspected "])).e(htn, "HTN", unc=True).t(", not on treatment. ")


def _en_vol(r: random.Random) -> str:
    n = r.randint(3, 90)
    return r.choice([f"{n} mL", f"{n}ml", f"{n} cc", f"{n} ml", f"{n}.{r.randint(1, 9)} mL"])


def _en_hem(b: _Builder, r: random.Random) -> None:
    loc = r.choice(EN_HEM_LOC)
    style = r.randrange(5)
    if style == 0:
        b.t("Outside CT: ").e(loc, "HEM_LOC").t(" hemorrhage, volume ").e(_en_vol(r), "HEM_VOL").t(". ")
    elif style == 1:
        b.t("Known ").e(loc, "HEM_LOC").t(" ICH, estimated ").e(_en_vol(r), "HEM_VOL").t(". ")
    elif style == 2:
        b.t("Transfer for ").e(loc, "HEM_LOC").t(" bleed of approximately ").e(_en_vol(r), "HEM_VOL").t(". ")
    elif style == 3:
        b.t("Prior CT showed ").e(loc, "HEM_LOC").t(" hematoma (").e(_en_vol(r), "HEM_VOL").t("). ")
    else:
        b.t("Eval for possible ").e(loc, "HEM_LOC", unc=True).t(" bleed. ")


def _en_neg_symptoms(b: _Builder, r: random.Random) -> None:
    syms = _en_sym(r, r.choice([1, 2]))
    b.t(r.choice(["Denies ", "No ", "Without "]))
    _en_join(b, syms, "SYMPTOM", neg=True, conj="or")
    b.t(". ")


def _en_note(r: random.Random) -> Document:
    b = _Builder()
    if r.random() < 0.3:  # head-CT request style
        b.t(r.choice(["CT head w/o contrast. ", "CT head without contrast: ", "Non-contrast CT brain. ",
                      "CTH STAT. "]))
    sections = [_en_vitals, _en_drugs, _en_htn, _en_hem, _en_neg_symptoms]
    weights = [0.75, 0.8, 0.6, 0.35, 0.4]
    chosen = [s for s, w in zip(sections, weights) if r.random() < w]
    r.shuffle(chosen)
    if r.random() < 0.9:
        _en_demo(b, r)
    _en_complaint(b, r)
    for section in chosen:
        section(b, r)
        if r.random() < 0.35:
            b.t(r.choice(EN_FILLER) + " ")
    if r.random() < 0.3:
        b.t(r.choice(["r/o ICH.", "Rule out bleed.", "Eval for hemorrhage.", "?ICH"]))
    return _strip(b.doc("en"))


# ----------------------------------------------------------------------------- Chinese
ZH_SYMPTOMS = ["头痛", "剧烈头痛", "头晕", "呕吐", "恶心", "喷射性呕吐", "左侧肢体无力", "右侧肢体无力",
               "左侧肢体活动不利", "右侧肢体麻木", "言语不清", "言语含糊", "失语", "口角歪斜",
               "意识障碍", "意识模糊", "昏迷", "嗜睡", "抽搐", "视物模糊", "大小便失禁", "走路不稳",
               "右侧偏瘫", "左侧偏瘫", "头胀痛", "反应迟钝", "胸闷", "四肢抽搐"]
ZH_ANTICOAG = ["华法林", "利伐沙班", "达比加群", "阿哌沙班", "肝素", "低分子肝素", "依诺肝素",
               "抗凝药", "抗凝药物", "新型口服抗凝药"]
ZH_ANTIPLT = ["阿司匹林", "氯吡格雷", "替格瑞洛", "波立维", "拜阿司匹灵", "抗血小板药物",
              "双联抗血小板药物"]
ZH_HTN = ["高血压", "高血压病", "原发性高血压"]
ZH_HEM_LOC = ["左侧基底节区", "右侧基底节区", "左侧丘脑", "右侧丘脑", "左侧颞叶", "右侧额叶",
              "左侧顶叶", "脑干", "桥脑", "小脑", "右侧小脑半球", "脑室内", "左侧壳核", "右侧枕叶",
              "蛛网膜下腔", "左侧额颞叶", "右侧基底节-丘脑区"]
ZH_FILLER = ["由120送入院。", "家属陪同。", "既往体健。", "糖尿病病史5年。", "否认外伤史。",
             "吸烟20余年。", "无药物过敏史。", "外院转入。", "绿色通道收入。", "有房颤病史。",
             "双侧瞳孔等大等圆。", "查体欠合作。", "神志清楚。", "双肺呼吸音清。", "心律齐。",
             "腹软，无压痛。", "已开通静脉通路。", "家属代诉病史。", "化验结果待回报。", "体重70kg。",
             "既往体健，无手术史。", "退休工人。", "由家属送来急诊。", "四肢可见自主活动。",
             "病情危重，已告知家属。", "请神经外科会诊。", "血糖6.8mmol/L。", "留置导尿。"]


def _zh_onset(r: random.Random) -> str:
    n = r.choice([1, 2, 3, 4, 5, 6, 8, 10, 12, 20, 24])
    m = r.choice([10, 20, 30, 40, 50])
    return r.choice([f"{n}小时", f"{n}小时前", f"{n}h", f"{m}分钟", f"{m}分钟前", f"{max(1, n // 8)}天",
                     f"{max(1, n // 8)}天前", "半小时", "半小时前", "半天", f"{n}小时余", "今晨", "昨晚"])


def _zh_join(b: _Builder, items: list[str], typ: str, *, neg: bool = False, unc: bool = False) -> None:
    for i, item in enumerate(items):
        if i:
            b.t("、" if i < len(items) - 1 else r_choice_zh_conj(i))
        b.e(item, typ, neg=neg, unc=unc)


def r_choice_zh_conj(i: int) -> str:
    return "及" if i % 2 else "、"


def _zh_demo(b: _Builder, r: random.Random) -> None:
    age = r.randint(18, 96)
    sex = r.choice(["男", "女", "男性", "女性"])
    style = r.randrange(4)
    if style == 0:
        b.t("患者").e(sex, "SEX").t("，").e(f"{age}岁", "AGE").t("，")
    elif style == 1:
        b.e(sex, "SEX").t("，").e(f"{age}岁", "AGE").t("。")
    elif style == 2:
        b.t("患者，").e(sex, "SEX").t("，").e(f"{age}岁", "AGE").t("，")
    else:
        b.e(f"{age}岁", "AGE").e(r.choice(["男性", "女性"]), "SEX").t("患者，")


def _zh_complaint(b: _Builder, r: random.Random) -> None:
    syms = r.sample(ZH_SYMPTOMS, r.choice([1, 1, 2, 3]))
    style = r.randrange(5)
    if style == 0:
        b.t("因突发").e(syms[0], "SYMPTOM")
        if len(syms) > 1:
            b.t("伴")
            _zh_join(b, syms[1:], "SYMPTOM")
        b.e(_zh_onset(r), "ONSET").t(r.choice(["入院。", "就诊。", "急诊入院。"]))
    elif style == 1:
        b.t(r.choice(["主诉：", "主诉:"]))
        _zh_join(b, syms, "SYMPTOM")
        b.e(_zh_onset(r), "ONSET").t("。")
    elif style == 2:
        b.t("患者于").e(_zh_onset(r), "ONSET").t(r.choice(["无明显诱因出现", "活动中突发", "情绪激动后出现"]))
        _zh_join(b, syms, "SYMPTOM")
        b.t("。")
    elif style == 3:
        b.t("起病").e(_zh_onset(r), "ONSET").t("，表现为")
        _zh_join(b, syms, "SYMPTOM")
        b.t("。")
    else:
        b.t("约").e(_zh_onset(r), "ONSET").t("突发")
        _zh_join(b, syms, "SYMPTOM")
        b.t(r.choice(["，遂来我院。", "，急诊就诊。", "。"]))


def _zh_gcs(r: random.Random) -> str:
    e, v, m = r.randint(1, 4), r.randint(1, 5), r.randint(1, 6)
    n = e + v + m
    return r.choice([f"GCS评分{n}分", f"GCS {n}分", f"GCS：{n}分", f"格拉斯哥昏迷评分{n}分",
                     f"GCS E{e}V{v}M{m}", f"昏迷评分{n}分", f"GCS{n}分"])


def _zh_bp(r: random.Random) -> str:
    s, d = r.randint(110, 240), r.randint(60, 135)
    return r.choice([f"血压{s}/{d}mmHg", f"血压：{s}/{d} mmHg", f"BP {s}/{d}mmHg",
                     f"血压{s}/{d} mmHg", f"BP：{s}/{d}mmHg"])


def _zh_vitals(b: _Builder, r: random.Random) -> None:
    items: list[tuple[str, str | None]] = [(f"心率{r.randint(50, 130)}次/分", None),
                                           (f"体温36.{r.randint(0, 9)}℃", None),
                                           (f"呼吸{r.randint(12, 30)}次/分", None)]
    if r.random() < 0.85:
        items.append((_zh_bp(r), "BP"))
    if r.random() < 0.6:
        items.append((_zh_gcs(r), "GCS"))
    r.shuffle(items)
    items = items[: r.randint(1, len(items))]
    b.t(r.choice(["查体：", "入院时", "", "急诊查体："]))
    for i, (text, typ) in enumerate(items):
        if i:
            b.t(r.choice(["，", "，", "；"]))
        if typ:
            b.e(text, typ)
        else:
            b.t(text)
    b.t("。")


def _zh_drugs(b: _Builder, r: random.Random) -> None:
    drug = r.choice(ZH_ANTICOAG + ZH_ANTIPLT)
    mode = r.choices(["pos", "neg", "unc"], [0.45, 0.4, 0.15])[0]
    if mode == "pos":
        style = r.randrange(4)
        if style == 0:
            b.t(r.choice(["长期口服", "规律服用", "平素服用"])).e(drug, "DRUG").t("。")
        elif style == 1:
            b.t("规律服用").e(drug, "DRUG").t(r.choice(["100mg qd。", "75mg qd。", "治疗。"]))
        elif style == 2:
            b.t("平素服用").e(r.choice(ZH_ANTIPLT), "DRUG").t("及").e(r.choice(ZH_ANTICOAG), "DRUG").t("。")
        else:
            b.t("房颤，服用").e(drug, "DRUG").t("抗凝治疗。")
    elif mode == "neg":
        style = r.randrange(5)
        if style == 0:
            b.t("否认服用").e(drug, "DRUG", neg=True).t("。")
        elif style == 1:
            b.t("未服用").e(drug, "DRUG", neg=True).t("。")
        elif style == 2:
            b.t("无").e(r.choice(ZH_ANTICOAG), "DRUG", neg=True).t("、")
            b.e(r.choice(ZH_ANTIPLT), "DRUG", neg=True).t("服用史。")
        elif style == 3:
            b.t("否认").e(drug, "DRUG", neg=True).t("等药物服用史。")
        else:
            b.t("未使用").e(drug, "DRUG", neg=True).t("，")
    else:
        style = r.randrange(3)
        if style == 0:
            b.e(drug, "DRUG", unc=True).t("服用史不详。")
        elif style == 1:
            b.t("可能服用").e(drug, "DRUG", unc=True).t("。")
        else:
            b.t("疑似服用").e(drug, "DRUG", unc=True).t("。")


def _zh_htn(b: _Builder, r: random.Random) -> None:
    htn = r.choice(ZH_HTN)
    mode = r.choices(["pos", "neg", "unc"], [0.6, 0.3, 0.1])[0]
    if mode == "pos":
        style = r.randrange(4)
        if style == 0:
            b.t("既往").e(htn, "HTN").t(f"病史{r.randint(2, 30)}年。")
        elif style == 1:
            b.t("有").e(htn, "HTN").t("病史，")
        elif style == 2:
            b.e(htn, "HTN").t(f"{r.randint(2, 30)}年，血压控制不佳。")
        else:
            b.t("既往有").e(htn, "HTN").t("史，未规律服药。")
    elif mode == "neg":
        style = r.randrange(3)
        if style == 0:
            b.t("否认").e(htn, "HTN", neg=True).t("病史。")
        elif style == 1:
            b.t("无").e(htn, "HTN", neg=True).t("、糖尿病史。")
        else:
            b.t("否认").e(htn, "HTN", neg=True).t("、冠心病史，")
    else:
        b.t("可能有").e(htn, "HTN", unc=True).t("病史。")


def _zh_vol(r: random.Random) -> str:
    n = r.randint(3, 90)
    return r.choice([f"{n}ml", f"{n}mL", f"{n}毫升", f"{n} ml", f"{n}.{r.randint(1, 9)}ml"])


def _zh_hem(b: _Builder, r: random.Random) -> None:
    loc = r.choice(ZH_HEM_LOC)
    style = r.randrange(4)
    if style == 0:
        b.t("外院头颅CT示").e(loc, "HEM_LOC").t("出血，出血量约").e(_zh_vol(r), "HEM_VOL").t("。")
    elif style == 1:
        b.t("CT提示").e(loc, "HEM_LOC").t("出血约").e(_zh_vol(r), "HEM_VOL").t("。")
    elif style == 2:
        b.e(loc, "HEM_LOC").t("脑出血，出血量").e(_zh_vol(r), "HEM_VOL").t("。")
    else:
        b.t("头颅CT：").e(loc, "HEM_LOC").t("出血可能。")
        # "可能" after the location: an uncertain finding.
        b.unc.add(b.spans[-1])


def _zh_neg_symptoms(b: _Builder, r: random.Random) -> None:
    syms = r.sample(ZH_SYMPTOMS, r.choice([1, 2]))
    b.t(r.choice(["无", "否认", "未诉", "不伴"]))
    _zh_join(b, syms, "SYMPTOM", neg=True)
    b.t("。")


def _zh_note(r: random.Random) -> Document:
    b = _Builder()
    if r.random() < 0.3:
        b.t(r.choice(["申请头颅CT平扫。", "急查头颅CT。", "头颅CT平扫申请："]))
    sections = [_zh_vitals, _zh_drugs, _zh_htn, _zh_hem, _zh_neg_symptoms]
    weights = [0.75, 0.8, 0.6, 0.35, 0.4]
    chosen = [s for s, w in zip(sections, weights) if r.random() < w]
    r.shuffle(chosen)
    if r.random() < 0.9:
        _zh_demo(b, r)
    _zh_complaint(b, r)
    for section in chosen:
        section(b, r)
        if r.random() < 0.35:
            b.t(r.choice(ZH_FILLER))
    if r.random() < 0.3:
        b.t(r.choice(["检查目的：排除颅内出血。", "临床诊断：脑出血？", "排除脑出血。"]))
    return _strip(b.doc("zh"))


def _strip(doc: Document) -> Document:
    # Trailing separators only: every span stays where it is.
    doc.text = doc.text.rstrip(" ，,")
    return doc


def generate(n: int, seed: int, lang: str = "both") -> list[Document]:
    """``n`` notes; ``lang`` 'en', 'zh' or 'both' (alternating). Same seed -> same notes."""
    if lang not in LANGS + ("both",):
        raise ValueError(f"unknown language {lang!r} (en, zh or both)")
    r = random.Random(seed)
    docs = []
    for i in range(n):
        which = lang if lang != "both" else LANGS[i % 2]
        docs.append(_en_note(r) if which == "en" else _zh_note(r))
    return docs
