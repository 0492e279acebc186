roulette-intro = أدر العجلة واربح خصمًا! لديك 3 محاولات.
roulette-btn-spin = أدر!
roulette-btn-again = مرة أخرى
roulette-btn-claim = احصل على رمزي
roulette-prize-10 = خصم 10%
roulette-prize-25 = خصم 25%
roulette-prize-shipping = شحن مجاني
roulette-prize-nothing = لا شيء هذه المرة
roulette-won = لقد ربحت { $prize_label }! اضغط الزر للحصول على رمزك.
roulette-code = رمزك: { $prize_code }. استخدمه عند الدفع.
roulette-lost = ليس هذه المرة. حاول مجددًا!
roulette-no-spins = لقد استخدمت كل محاولاتك. ادعُ صديقًا لتحصل على محاولة أخرى: https://t.me/ExampleShopBot?start={ $referral_ref }
roulette-out = عذرًا، نفدت الجوائز. شكرًا لمشاركتك!
