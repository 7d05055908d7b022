"""A small HLBD sample shipped with the package: 100 everyday concepts.

Each concept has an emoji, a character card (字卡), a short Chinese phrase
(短语), its pinyin (拼音), English (英文), Japanese (日文) and Korean (韩文)
renderings, and a Chinese sentence (中文) that serves as the target.  With the
default levels that is 6 pairs per concept, 600 pairs in all, with sources of
1 to about 40 characters and targets of about 7 to 30 characters, the shape
of the full HLBD workload.  ``level_3`` (数学) is not part of this sample.

:func:`bundled_samples` returns the samples in HLBD format (fresh copies);
:func:`save_bundled_hlbd` writes them as an HLBD JSON file.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any, Union

__all__ = ["BUNDLED_TABLE", "bundled_samples", "save_bundled_hlbd"]

PathLike = Union[str, "os.PathLike[str]"]

#: One row per concept:
#: (concept, emoji, 字卡, 短语, 拼音, 英文, 日文, 韩文, 中文 sentence).
BUNDLED_TABLE: tuple[tuple[str, str, str, str, str, str, str, str, str], ...] = (
    ("rain", "🌧️", "雨", "下雨", "xià yǔ", "It is raining", "雨が降っている", "비가 와요", "下雨了，出门记得带伞。"),
    ("love", "❤️", "爱", "我爱你", "wǒ ài nǐ", "I love you", "愛してる", "사랑해", "我爱你，不管发生什么，我都会一直陪在你身边。"),
    ("sun", "☀️", "日", "太阳", "tài yáng", "The sun", "太陽", "태양", "太阳从东方升起，照亮了大地。"),
    ("moon", "🌙", "月", "月亮", "yuè liang", "The moon", "月", "달", "今晚的月亮又圆又亮。"),
    ("star", "⭐", "星", "星星", "xīng xing", "A star", "星", "별", "夜空中有很多闪闪发光的星星。"),
    ("snow", "❄️", "雪", "下雪", "xià xuě", "It is snowing", "雪が降っている", "눈이 와요", "下雪了，外面一片白茫茫。"),
    ("cloud", "☁️", "云", "云朵", "yún duǒ", "White clouds", "白い雲", "하얀 구름", "蓝天上飘着几朵白云。"),
    ("wind", "🌬️", "风", "刮风", "guā fēng", "The wind is blowing", "風が吹いている", "바람이 불어요", "今天刮大风，出门要多穿一点。"),
    ("rainbow", "🌈", "虹", "彩虹", "cǎi hóng", "A rainbow after the rain", "雨上がりの虹", "비 온 뒤의 무지개", "雨停了，天空出现了一道彩虹。"),
    (
        "thunder",
        "⚡",
        "雷",
        "打雷",
        "dǎ léi",
        "There is thunder and lightning outside",
        "外で雷が鳴っている",
        "밖에 천둥이 쳐요",
        "外面打雷又闪电，我们快回家吧。",
    ),
    ("fire", "🔥", "火", "火焰", "huǒ yàn", "Fire is hot", "火は熱い", "불은 뜨거워요", "火很烫，千万不要用手去碰。"),
    ("water", "💧", "水", "喝水", "hē shuǐ", "Drink water", "水を飲む", "물을 마셔요", "每天都要多喝水。"),
    ("tree", "🌳", "树", "大树", "dà shù", "A big tree", "大きな木", "큰 나무", "公园里有一棵很老的大树。"),
    ("flower", "🌸", "花", "开花", "kāi huā", "The flowers are blooming", "花が咲いている", "꽃이 피었어요", "春天到了，公园里的花都开了。"),
    ("mountain", "⛰️", "山", "爬山", "pá shān", "Climb a mountain", "山に登る", "산에 올라요", "周末我们一起去爬山吧。"),
    ("sea", "🌊", "海", "大海", "dà hǎi", "The sea", "海", "바다", "大海又大又蓝，一眼望不到边。"),
    ("cat", "🐱", "猫", "小猫", "xiǎo māo", "A kitten", "子猫", "새끼 고양이", "小猫在沙发上睡觉。"),
    ("dog", "🐶", "狗", "小狗", "xiǎo gǒu", "A puppy", "子犬", "강아지", "小狗看见主人，高兴地摇着尾巴。"),
    ("bird", "🐦", "鸟", "小鸟", "xiǎo niǎo", "A little bird", "小鳥", "작은 새", "小鸟在树上唱歌。"),
    ("fish", "🐟", "鱼", "小鱼", "xiǎo yú", "A small fish", "小さな魚", "작은 물고기", "小鱼在河里游来游去。"),
    ("horse", "🐴", "马", "骑马", "qí mǎ", "Ride a horse", "馬に乗る", "말을 타요", "他在大草原上骑马。"),
    ("rabbit", "🐰", "兔", "兔子", "tù zi", "A rabbit", "うさぎ", "토끼", "小白兔喜欢吃胡萝卜。"),
    ("panda", "🐼", "熊", "熊猫", "xióng māo", "A giant panda", "パンダ", "판다", "大熊猫最喜欢吃竹子。"),
    ("apple", "🍎", "果", "苹果", "píng guǒ", "An apple", "りんご", "사과", "我每天吃一个红苹果。"),
    ("banana", "🍌", "蕉", "香蕉", "xiāng jiāo", "A banana", "バナナ", "바나나", "猴子最爱吃香蕉。"),
    ("meal", "🍚", "饭", "吃饭", "chī fàn", "Have a meal", "ご飯を食べる", "밥을 먹어요", "到中午了，我们一起去吃饭吧。"),
    ("noodles", "🍜", "面", "面条", "miàn tiáo", "A bowl of noodles", "ラーメン", "국수", "我中午吃了一大碗牛肉面。"),
    ("tea", "🍵", "茶", "喝茶", "hē chá", "Drink tea", "お茶を飲む", "차를 마셔요", "爷爷喜欢在下午喝一杯绿茶。"),
    ("coffee", "☕", "啡", "咖啡", "kā fēi", "A cup of coffee", "コーヒー", "커피 한 잔", "早上一杯咖啡让我精神很好。"),
    ("bread", "🍞", "包", "面包", "miàn bāo", "Bread", "パン", "빵", "妈妈早上烤了香喷喷的面包。"),
    ("milk", "🥛", "奶", "牛奶", "niú nǎi", "A glass of milk", "牛乳", "우유", "小朋友每天早上喝一杯牛奶。"),
    ("egg", "🥚", "蛋", "鸡蛋", "jī dàn", "An egg", "卵", "달걀", "我早饭吃了两个煮鸡蛋。"),
    ("cake", "🎂", "糕", "蛋糕", "dàn gāo", "A birthday cake", "誕生日ケーキ", "생일 케이크", "桌子上放着一个很大的生日蛋糕。"),
    ("home", "🏠", "家", "回家", "huí jiā", "Go home", "家に帰る", "집에 가요", "放学以后我马上回家。"),
    ("school", "🏫", "校", "学校", "xué xiào", "School", "学校", "학교", "我每天走路去学校上课。"),
    ("book", "📖", "书", "看书", "kàn shū", "Read a book", "本を読む", "책을 읽어요", "我喜欢在睡觉前看书。"),
    ("pencil", "✏️", "笔", "铅笔", "qiān bǐ", "A pencil", "鉛筆", "연필", "请借我一支铅笔，好吗？"),
    ("car", "🚗", "车", "汽车", "qì chē", "A red car", "赤い車", "빨간 자동차", "门口停着一辆红色的汽车。"),
    ("bicycle", "🚲", "骑", "自行车", "zì xíng chē", "Ride a bicycle", "自転車に乗る", "자전거를 타요", "我每天骑自行车去上班。"),
    ("train", "🚆", "轨", "火车", "huǒ chē", "The train is leaving", "電車が出発する", "기차가 떠나요", "火车马上就要开了，快上车！"),
    ("airplane", "✈️", "飞", "飞机", "fēi jī", "An airplane", "飛行機", "비행기", "飞机在白云上面飞得很高。"),
    ("boat", "⛵", "船", "坐船", "zuò chuán", "Take a boat", "船に乗る", "배를 타요", "我们坐船去对面的小岛。"),
    ("phone", "📱", "机", "手机", "shǒu jī", "My phone is out of battery", "携帯の電池が切れた", "휴대폰 배터리가 없어요", "我的手机没电了，借我充一下电吧。"),
    ("computer", "💻", "脑", "电脑", "diàn nǎo", "A computer", "パソコン", "컴퓨터", "他每天用电脑工作八个小时。"),
    ("music", "🎵", "乐", "音乐", "yīn yuè", "Listen to music", "音楽を聴く", "음악을 들어요", "我一边听音乐，一边写作业。"),
    ("sing", "🎤", "歌", "唱歌", "chàng gē", "Sing a song", "歌を歌う", "노래를 불러요", "她唱歌唱得非常好听。"),
    ("dance", "💃", "舞", "跳舞", "tiào wǔ", "Let's dance together", "一緒に踊ろう", "같이 춤을 춰요", "晚会上大家一起开心地跳舞。"),
    ("run", "🏃", "跑", "跑步", "pǎo bù", "Go for a run", "走る", "달리기를 해요", "我每天早上去公园跑步。"),
    ("swim", "🏊", "泳", "游泳", "yóu yǒng", "Go swimming", "泳ぐ", "수영해요", "夏天我们常常去河边游泳。"),
    ("sleep", "😴", "睡", "睡觉", "shuì jiào", "Time to sleep", "もう寝る時間", "잘 시간이에요", "太晚了，该睡觉了，晚安。"),
    ("happy", "😊", "喜", "快乐", "kuài lè", "Happy", "嬉しい", "행복해요", "祝你每天都快快乐乐。"),
    ("sad", "😢", "哭", "难过", "nán guò", "I feel sad", "悲しい", "슬퍼요", "听到这个消息，他难过得哭了。"),
    ("angry", "😠", "怒", "生气", "shēng qì", "Angry", "怒っている", "화가 나요", "弟弟弄坏了玩具，妈妈有点生气。"),
    ("laugh", "😂", "笑", "大笑", "dà xiào", "Laugh out loud", "大笑いする", "크게 웃어요", "这个笑话让大家哈哈大笑。"),
    ("hello", "🙋", "好", "你好", "nǐ hǎo", "Hello", "こんにちは", "안녕하세요", "你好，很高兴认识你。"),
    ("goodbye", "👋", "见", "再见", "zài jiàn", "Goodbye", "さようなら", "안녕히 가세요", "再见，我们明天见！"),
    ("thanks", "🙏", "谢", "谢谢", "xiè xie", "Thank you", "ありがとう", "감사합니다", "谢谢你帮了我这么多忙。"),
    ("sorry", "🙇", "歉", "对不起", "duì bu qǐ", "I am sorry", "ごめんなさい", "미안해요", "对不起，我来晚了。"),
    ("friend", "🤝", "友", "朋友", "péng you", "A good friend", "いい友達", "좋은 친구", "他是我从小一起长大的好朋友。"),
    ("family", "👨‍👩‍👧", "亲", "家人", "jiā rén", "My family", "私の家族", "우리 가족", "周末我和家人一起去公园野餐。"),
    ("mother", "👩", "妈", "妈妈", "mā ma", "Mom", "お母さん", "엄마", "妈妈每天给我们做好吃的饭菜。"),
    ("father", "👨", "爸", "爸爸", "bà ba", "Dad", "お父さん", "아빠", "爸爸每天开车送我去学校。"),
    ("baby", "👶", "婴", "宝宝", "bǎo bao", "A baby", "赤ちゃん", "아기", "宝宝在小床上睡得很香。"),
    ("teacher", "👩‍🏫", "师", "老师", "lǎo shī", "A teacher", "先生", "선생님", "老师在教室里给我们讲故事。"),
    ("doctor", "👨‍⚕️", "医", "医生", "yī shēng", "See a doctor", "医者に診てもらう", "의사에게 진찰을 받아요", "医生说我要多喝水，多休息。"),
    ("hospital", "🏥", "院", "医院", "yī yuàn", "Hospital", "病院", "병원", "医院里有很多医生和护士。"),
    ("money", "💰", "钱", "存钱", "cún qián", "Save money", "お金を貯める", "돈을 모아요", "他把零花钱存进了银行。"),
    ("gift", "🎁", "礼", "礼物", "lǐ wù", "A gift for you", "あなたへのプレゼント", "당신을 위한 선물", "这是我送给你的生日礼物。"),
    ("time", "⏳", "时", "时间", "shí jiān", "Time flies", "時間が経つのは早い", "시간이 빨리 가요", "时间过得真快，一年又过去了。"),
    ("clock", "⏰", "钟", "闹钟", "nào zhōng", "The alarm clock is ringing", "目覚まし時計が鳴っている", "알람 시계가 울려요", "闹钟响了，快起床吧。"),
    ("morning", "🌅", "早", "早上好", "zǎo shang hǎo", "Good morning", "おはよう", "좋은 아침이에요", "早上好，今天天气真不错。"),
    ("night", "🌃", "夜", "晚上", "wǎn shang", "The city at night", "夜の町", "밤의 도시", "晚上城市里的灯光非常漂亮。"),
    ("spring", "🌱", "春", "春天", "chūn tiān", "Spring", "春", "봄", "春天来了，小草从地里钻了出来。"),
    ("summer", "🏖️", "夏", "夏天", "xià tiān", "Summer", "夏", "여름", "夏天很热，我们去海边玩水。"),
    ("autumn", "🍂", "秋", "秋天", "qiū tiān", "Autumn", "秋", "가을", "秋天到了，树叶慢慢变黄了。"),
    ("winter", "⛄", "冬", "冬天", "dōng tiān", "Winter", "冬", "겨울", "冬天很冷，孩子们在外面堆雪人。"),
    ("hot", "🥵", "热", "很热", "hěn rè", "It is very hot", "とても暑い", "너무 더워요", "今天很热，我们去吃冰淇淋吧。"),
    ("cold", "🥶", "冷", "很冷", "hěn lěng", "It is very cold", "とても寒い", "너무 추워요", "外面很冷，别忘了戴上帽子和手套。"),
    ("cook", "🍳", "煮", "做饭", "zuò fàn", "Cook dinner", "晩ご飯を作る", "저녁을 만들어요", "爸爸在厨房里给全家人做饭。"),
    ("hungry", "🤤", "饿", "饿了", "è le", "I am hungry", "お腹が空いた", "배고파요", "我肚子饿了，想吃点东西。"),
    ("thirsty", "🥤", "渴", "口渴", "kǒu kě", "I am thirsty", "喉が渇いた", "목말라요", "我口渴了，请给我一杯水。"),
    ("tired", "😩", "累", "很累", "hěn lèi", "I am tired", "疲れた", "피곤해요", "工作了一整天，我觉得很累。"),
    ("sick", "🤒", "病", "生病", "shēng bìng", "I have a fever", "熱がある", "열이 나요", "他生病发烧了，今天没有来上课。"),
    ("glad", "😄", "心", "开心", "kāi xīn", "Have fun", "楽しい", "즐거워요", "今天和朋友们玩得很开心。"),
    ("world", "🌍", "世", "世界", "shì jiè", "Travel around the world", "世界を旅する", "세계를 여행해요", "我长大以后想去看看这个世界。"),
    ("city", "🏙️", "城", "城市", "chéng shì", "A big city", "大きな都市", "큰 도시", "这座城市很大，街上非常热闹。"),
    ("road", "🚦", "路", "过马路", "guò mǎ lù", "Cross the road", "道を渡る", "길을 건너요", "过马路的时候要看红绿灯。"),
    ("door", "🚪", "门", "开门", "kāi mén", "Open the door", "ドアを開ける", "문을 열어요", "有人敲门，请帮我开一下门。"),
    ("key", "🔑", "钥", "钥匙", "yào shi", "I lost my key", "鍵をなくした", "열쇠를 잃어버렸어요", "我找不到家里的钥匙了。"),
    ("light", "💡", "灯", "开灯", "kāi dēng", "Turn on the light", "電気をつける", "불을 켜요", "天黑了，请把灯打开。"),
    ("soccer", "⚽", "球", "踢足球", "tī zú qiú", "Play soccer", "サッカーをする", "축구를 해요", "我们放学后一起去操场踢足球。"),
    ("game", "🎮", "戏", "玩游戏", "wán yóu xì", "Play video games", "ゲームをする", "게임을 해요", "弟弟在房间里玩游戏。"),
    ("movie", "🎬", "影", "看电影", "kàn diàn yǐng", "Watch a movie", "映画を見る", "영화를 봐요", "周末我们一起去看电影吧。"),
    ("photo", "📷", "照", "拍照", "pāi zhào", "Take a photo", "写真を撮る", "사진을 찍어요", "我们在长城上拍了很多照片。"),
    ("write", "✍️", "写", "写字", "xiě zì", "Write characters", "字を書く", "글씨를 써요", "小明在认真地写汉字。"),
    ("study", "📚", "学", "学习", "xué xí", "Study hard", "一生懸命勉強する", "열심히 공부해요", "我们要努力学习中文。"),
    ("work", "💼", "工", "上班", "shàng bān", "Go to work", "仕事に行く", "출근해요", "妈妈每天早上八点去上班。"),
    ("shopping", "🛒", "买", "买东西", "mǎi dōng xi", "Go shopping", "買い物をする", "장을 봐요", "妈妈去超市买东西了。"),
    ("travel", "🧳", "旅", "旅行", "lǚ xíng", "Go on a trip", "旅行に行く", "여행을 가요", "今年夏天我们全家去北京旅行。"),
    ("China", "🇨🇳", "中", "中国", "zhōng guó", "China", "中国", "중국", "中国有五千年的悠久历史。"),
)


def _row_to_sample(row: tuple[str, ...]) -> dict[str, Any]:
    concept, emoji, card, phrase, pinyin, english, japanese, korean, chinese = row
    return {
        "concept": concept,
        "level_1": {"字卡": card, "emoji": emoji},
        "level_2": {"短语": phrase},
        "level_4": {"拼音": pinyin},
        "level_5": {"英文": english},
        "level_6": {"中文": chinese},
        "level_7": {"日文": japanese},
        "level_8": {"韩文": korean},
    }


_SAMPLES: tuple[dict[str, Any], ...] = tuple(_row_to_sample(r) for r in BUNDLED_TABLE)


def bundled_samples() -> list[dict[str, Any]]:
    """Return the bundled HLBD samples (100 concepts) as fresh deep copies, in fixed order."""
    return copy.deepcopy(list(_SAMPLES))


def save_bundled_hlbd(path: PathLike) -> Path:
    """Write the bundled samples as an HLBD JSON file ``{"samples": [...]}``.

    The file can be read back with ``load_hlbd(path)``.  Returns the path.
    """
    p = Path(path)
    p.write_text(
        json.dumps({"samples": bundled_samples()}, ensure_ascii=False, indent=1) + "\n",
        encoding="utf-8",
    )
    return p
